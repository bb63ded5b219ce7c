"""Who may do what on the bus: one NATS identity per agent and per role, each an NKEY user of
nats-server with publish/subscribe permissions generated from what it declares.

Three pieces, all data:

- `Permissions` of an identity, as nats-server's per-user ``permissions`` block. An agent's
  come from its `AgentGrant` (what its declaration says it handles: event types, joins,
  approvals); a person's or a tool's from its role (`ROLES`).
- `Keyring`: the seeds, one file per identity (mode 0600), and the users the server knows,
  under ``<data_dir>/auth`` (or any directory given for deployment, see `mesh creds`).
- `auth_config`: the ``authorization`` block the server includes (``auth.conf``).

Every identity receives replies on its own inbox prefix, ``_INBOX.<its public key>``, so one
identity cannot subscribe to the answers another is waiting for. The client side derives that
prefix from the seed (`connect_options`). Why server users and not decentralized JWTs, and
what is and is not protected: docs/security.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import nkeys  # type: ignore[import-untyped]

from mesh.transport import streams
from mesh.wire import subjects
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

Role = Literal["operator", "publisher", "observer"]
ROLES: Final[tuple[Role, ...]] = ("operator", "publisher", "observer")

_SEED = re.compile(rb"SU[A-Z2-7]{56}")
_JWT_MARK: Final = b"BEGIN NATS USER JWT"
_API: Final = "$JS.API"
_MESH: Final = subjects.ROOT


def inbox_prefix(public_key: str) -> str:
    """Where an identity's replies arrive: its own space under ``_INBOX``."""
    return f"_INBOX.{public_key}"


@dataclass(frozen=True, slots=True)
class Permissions:
    """What an identity may publish to and subscribe to (nats-server subject patterns);
    everything else is refused by the server."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    subscribe_deny: tuple[str, ...] = ()

    def config(self) -> dict[str, Any]:
        sub: dict[str, Any] = {"allow": sorted(set(self.subscribe))}
        if self.subscribe_deny:
            sub["deny"] = sorted(set(self.subscribe_deny))
        return {"publish": {"allow": sorted(set(self.publish))}, "subscribe": sub}


@dataclass(frozen=True, slots=True)
class AgentGrant:
    """What an agent's declaration says it does on the bus: its name, the event types it
    consumes, whether it keeps joins (timers) and parks tool calls for approval, and the
    memory namespaces it uses (None: not declared). The memory scopes are not a server
    permission: they travel with the identity in ``users.json`` to the memory service."""

    name: str
    events: tuple[str, ...] = ()
    joins: bool = False
    approvals: bool = False
    escalates: bool = False  # parks failed work for people (`mesh escalations`)
    memory: tuple[str, ...] | None = None

    @property
    def timers(self) -> bool:
        return self.joins or self.approvals


def _stream_info(settings: Settings) -> list[str]:
    names = [s.name for s in streams.stream_specs(settings)] + [
        f"KV_{b.name}" for b in streams.bucket_specs(settings)
    ]
    return [f"{_API}.STREAM.INFO.{n}" for n in names]


def _reads(settings: Settings) -> list[str]:
    """Read-only views every identity gets: whether the mesh's streams exist, and discovery."""
    return [f"{_API}.INFO", *_stream_info(settings), "$SRV.PING", "$SRV.INFO", "$SRV.STATS", "$SRV.*.>"]


def agent_permissions(grant: AgentGrant, settings: Settings, public_key: str) -> Permissions:
    """Exactly what agent `grant.name` needs, and nothing more:

    - receive: its direct line, its own durable consumers (info, next, create with its own
      filter, acknowledgements), its consumers' max-deliveries advisories, discovery
      requests, and replies on its own inbox prefix;
    - send: any agent's inbox and direct line (handoffs and requests name their target at
      run time; the declaration does not list them), events of any type (`ctx.publish`
      takes any), answers to outside requesters (``reply`` subjects and ``_INBOX``), its
      own timers, its own dead letters, its own audit records and its own entries in the
      conversation record;
    - state: its own keys of ``MESH_PROCESSED``, ``MESH_SEEN``, ``MESH_JOURNAL`` and
      ``MESH_STATE`` (joins, failure histories), read by key; its approvals if it has tools
      (any call may be parked); the model budgets' counts in ``MESH_STATE`` (``budget.>``),
      which are everyone's.

    Never: another agent's consumers, stream or consumer administration, reading stored
    messages (dead letters), other agents' state.
    """
    a = subjects.agent_name(grant.name)
    inbox, direct, timer = subjects.inbox_pattern(a), subjects.direct_pattern(a), subjects.timer_pattern(a)
    own: list[tuple[str, str]] = [(streams.INBOX, inbox)]
    own += [(streams.EVENTS, subjects.event_pattern(t)) for t in grant.events]
    if grant.timers:
        own.append((streams.TIMERS, timer))
    consumers = sorted({stream for stream, _ in own})
    publish = [
        *_reads(settings),
        f"{_MESH}.*.{subjects.AGENT}.*",
        f"{_MESH}.*.{subjects.DIRECT}.*",
        f"{_MESH}.*.{subjects.EVENT}.>",
        f"{_MESH}.*.{subjects.LIVE}.>",  # live-only events (streamed chunks), never stored
        f"{_MESH}.*.{subjects.REPLY}.*",
        f"{_MESH}.*.{subjects.DEAD_LETTER}.{a}",
        subjects.audit_pattern(a),  # its own audit chains, never another's
        subjects.record_pattern(writer=a),  # its own entries in the conversation record
        "_INBOX.>",  # answers to requesters: direct requests, discovery, Mesh-Reply-To
        *(f"{_API}.CONSUMER.INFO.{s}.{a}" for s in consumers),
        *(f"{_API}.CONSUMER.MSG.NEXT.{s}.{a}" for s in consumers),
        *(f"$JS.ACK.{s}.{a}.>" for s in consumers),
        # create or update its consumers, only with its own filter (the server checks the
        # filter in the subject against the one in the request)
        *(f"{_API}.CONSUMER.CREATE.{s}.{a}.{f}" for s, f in own),
        f"$KV.{streams.PROCESSED}.{a}.>",
        # ids of the signed direct messages it took (replays); a create that finds the key
        # reads it, to tell a live one from a deleted one
        f"$KV.{streams.SEEN}.{a}.>",
        f"{_API}.DIRECT.GET.KV_{streams.SEEN}.$KV.{streams.SEEN}.{a}.>",
        f"{_API}.DIRECT.GET.KV_{streams.PROCESSED}",  # batched lookups name keys in the body
        # one key at a time, its own, where a batch is not answered (kvbatch)
        f"{_API}.DIRECT.GET.KV_{streams.PROCESSED}.$KV.{streams.PROCESSED}.{a}.>",
        # its journal of model replies and tool results (mesh.llm.journal), read by key only:
        # no batched reads, whose keys are in the body where the server cannot check them
        f"$KV.{streams.JOURNAL}.{a}.>",
        f"{_API}.DIRECT.GET.KV_{streams.JOURNAL}.$KV.{streams.JOURNAL}.{a}.>",
        # the conversations cancelled before it started (mesh.runtime.cancel), read at start
        f"{_API}.DIRECT.GET.{streams.CANCELS}",
        f"{_API}.DIRECT.GET.{streams.CANCELS}.>",
        *_state_keys(a, grant),
    ]
    if grant.timers:
        publish.append(subjects.Address.timer("*", a).subject)
    subscribe = [
        direct,
        f"{inbox_prefix(public_key)}.>",
        *(f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s}.{a}" for s in consumers),
        "$SRV.PING",
        "$SRV.INFO",
        "$SRV.STATS",
        f"$SRV.*.{a}",
        f"$SRV.*.{a}.*",
        subjects.cancel_pattern(),  # `mesh cancel`: every process of every agent hears it
    ]
    return Permissions(tuple(publish), tuple(subscribe))


def _state_keys(agent: str, grant: AgentGrant) -> list[str]:
    spaces = [f"failures.{agent}", f"joins.{agent}"] + ([f"approvals.{agent}"] if grant.approvals else [])
    spaces += [f"escalations.{agent}"] if grant.escalates else []
    # model budgets (mesh.llm.budget) are shared: a conversation's by every agent it reaches,
    # a tenant's by every agent working for it (the tenant is a setting, not the identity's),
    # so any agent may count in any of them; the price is that one could also reset them
    spaces.append("budget")
    out = []
    for space in spaces:
        out.append(f"$KV.{streams.STATE}.{space}.>")
        out.append(f"{_API}.DIRECT.GET.KV_{streams.STATE}.$KV.{streams.STATE}.{space}.>")
    return out


def role_permissions(role: Role, settings: Settings, public_key: str) -> Permissions:
    """A person's or a tool's permissions:

    - ``operator``: everything (streams, dead letters, approvals, `mesh up`, `mesh dlq`);
    - ``publisher``: start work, watch it and cancel it (`mesh publish`, `mesh cancel`, your
      programs): send to inboxes, direct lines and events, and what an observer may; no timers (approval
      decisions and join deadlines), no dead letters, no state;
    - ``observer``: watch (`mesh tap`, `mesh agents`): every mesh subject but dead letters,
      discovery, consumer state, stored events by subject; publishes nothing on the mesh.
    """
    replies = f"{inbox_prefix(public_key)}.>"
    if role == "operator":
        return Permissions((">",), (">",))
    consumer_reads = [
        f"{_API}.CONSUMER.INFO.*.*",
        f"{_API}.CONSUMER.LIST.*",
        f"{_API}.CONSUMER.NAMES.*",
        # stored events, as they see them live (a streamed answer's final message, history)
        f"{_API}.STREAM.MSG.GET.{streams.EVENTS}",
        f"{_API}.DIRECT.GET.{streams.EVENTS}",
        f"{_API}.DIRECT.GET.{streams.EVENTS}.>",
        # the conversation record (`mesh conversations`, `mesh show`): what they may watch live
        f"{_API}.STREAM.MSG.GET.{streams.RECORD}",
        f"{_API}.DIRECT.GET.{streams.RECORD}",
        f"{_API}.DIRECT.GET.{streams.RECORD}.>",
    ]
    if role == "publisher":
        publish = [
            *_reads(settings),
            *consumer_reads,
            f"{_MESH}.*.{subjects.AGENT}.*",
            f"{_MESH}.*.{subjects.DIRECT}.*",
            f"{_MESH}.*.{subjects.EVENT}.>",
            subjects.record_pattern(writer=role),  # what it sends, in the conversation record
            subjects.cancel_pattern(),  # stop work it started (`mesh cancel`)
            f"{subjects.CANCELLED_ROOT}.*",  # and keep the cancellation for agents started later
        ]
        # and watch what it started (`mesh publish --wait-for`), as an observer does
        return Permissions(
            tuple(publish), (replies, f"{_MESH}.>"), subscribe_deny=(subjects.dead_letter_pattern(),)
        )
    if role == "observer":
        return Permissions(
            (*_reads(settings), *consumer_reads),
            (replies, f"{_MESH}.>"),
            subscribe_deny=(subjects.dead_letter_pattern(),),
        )
    raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")


# -- keys and the users the server knows ------------------------------------------------


def new_seed() -> bytes:
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))


def public_key(seed: bytes) -> str:
    kp = nkeys.from_seed(bytearray(seed))
    return str(kp.public_key.decode())


def creds_text(seed: bytes) -> str:
    """A credentials file holding an NKEY seed (the seed half of a NATS ``.creds`` file)."""
    return (
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
        "NKEY Seeds are sensitive and should be treated as secrets.\n"
        "*************************************************************\n"
    )


def read_seed(path: Path) -> bytes:
    """The NKEY seed in a credentials file: a seed file of `mesh creds`, or a JWT ``.creds``
    file (decentralized auth), which holds the user's seed after its JWT."""
    found = _SEED.search(path.read_bytes())
    if found is None:
        raise ConfigError(f"{path} holds no NATS user seed (SU...): not a credentials file")
    return found.group(0)


def holds_jwt(path: Path) -> bool:
    return _JWT_MARK in path.read_bytes()


def connect_options(creds: Path) -> dict[str, Any]:
    """nats-py connect options for a credentials file, with the inbox prefix its identity
    receives replies on: a JWT ``.creds`` as it is (the JWT must allow subscribing there), an
    NKEY seed file by its seed."""
    try:
        seed, jwt = read_seed(creds), holds_jwt(creds)
    except OSError as exc:
        raise ConfigError(f"cannot read the NATS credentials {creds}: {exc.strerror}") from None
    prefix = inbox_prefix(public_key(seed))
    if jwt:
        return {"user_credentials": str(creds), "inbox_prefix": prefix}
    return {"nkeys_seed_str": seed.decode(), "inbox_prefix": prefix}


def client_options(settings: Settings) -> dict[str, Any]:
    """nats-py connect options for this process's identity (`connect_options`) and TLS: a
    context that trusts MESH_NATS_TLS_CA (else the system's store) and presents
    MESH_NATS_TLS_CERT when given."""
    options = connect_options(settings.nats_creds) if settings.nats_creds else {}
    ca, cert, key = settings.nats_tls_ca, settings.nats_tls_cert, settings.nats_tls_key
    if ca is None and cert is None:
        return options
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
        if cert is not None and key is not None:
            context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use the TLS files (MESH_NATS_TLS_*): {exc}") from None
    return {**options, "tls": context}


@dataclass(frozen=True, slots=True)
class User:
    identity: str  # "agent:<name>" or "role:<role>"
    nkey: str
    permissions: Permissions
    memory: tuple[str, ...] | None = None  # an agent's declared memory scopes

    def row(self) -> dict[str, Any]:
        """As ``users.json`` holds it."""
        row = {"identity": self.identity, "nkey": self.nkey, "permissions": self.permissions.config()}
        if self.memory is not None:
            row["memory"] = list(self.memory)
        return row


@dataclass
class Keyring:
    """Seeds and users under one directory: ``agents/<name>/<name>.creds`` and
    ``roles/<role>/<role>.creds`` (mode 0600), ``users.json`` (who the server admits, with
    what) and ``auth.conf`` (the same, as the server reads it)."""

    directory: Path
    _users: dict[str, User] = field(default_factory=dict)

    @property
    def conf_path(self) -> Path:
        return self.directory / "auth.conf"

    def creds_path(self, identity: str) -> Path:
        kind, name = identity.split(":", 1)
        # a directory each, so a container can be given its own and no other (a volume subpath)
        return self.directory / ("agents" if kind == "agent" else "roles") / name / f"{name}.creds"

    @contextlib.contextmanager
    def locked(self) -> Iterator[Keyring]:
        """Read, change and write the users under a lock: agents of one data dir may start at once."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._load()
            yield self
        finally:
            os.close(fd)

    def _load(self) -> None:
        self._users = {}
        try:
            raw = json.loads((self.directory / "users.json").read_text())
        except FileNotFoundError:
            return
        for u in raw:
            p = u["permissions"]
            perms = Permissions(
                tuple(p["publish"]["allow"]),
                tuple(p["subscribe"]["allow"]),
                tuple(p["subscribe"].get("deny", ())),
            )
            memory = tuple(u["memory"]) if isinstance(u.get("memory"), list) else None
            self._users[u["identity"]] = User(u["identity"], u["nkey"], perms, memory)

    def _seed(self, identity: str) -> bytes:
        path = self.creds_path(identity)
        if path.exists():
            return read_seed(path)
        seed = new_seed()
        _write_creds(path, creds_text(seed))
        return seed

    def issue_role(self, role: Role, settings: Settings) -> bool:
        """Make sure `role` has a seed and a user; True if the users changed."""
        seed = self._seed(f"role:{role}")
        pk = public_key(seed)
        return self._put(User(f"role:{role}", pk, role_permissions(role, settings, pk)))

    def issue_agent(self, grant: AgentGrant, settings: Settings) -> bool:
        """Make sure agent `grant.name` has a seed and a user with the permissions of its
        declaration; True if the users changed (the server must reload)."""
        seed = self._seed(f"agent:{grant.name}")
        pk = public_key(seed)
        perms = agent_permissions(grant, settings, pk)
        return self._put(User(f"agent:{grant.name}", pk, perms, grant.memory))

    def adopt(self, identity: str, creds: Path) -> None:
        """Give `identity` the key of an existing credentials file (a JWT ``.creds`` made with
        ``nsc``): the file is copied in, and the next issue uses its key."""
        try:
            read_seed(creds)
            text = creds.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the credentials {creds}: {exc}") from None
        _write_creds(self.creds_path(identity), text)

    def revoke(self, identity: str) -> bool:
        """Forget an identity and its seed (rotation: revoke, then issue again)."""
        gone = self._users.pop(identity, None) is not None
        with contextlib.suppress(FileNotFoundError):
            self.creds_path(identity).unlink()
        if gone:
            self._write()
        return gone

    def _put(self, user: User) -> bool:
        known = self._users.get(user.identity)
        if known is not None and known.row() == user.row():
            return False  # the same (compared as written: sorted, without repeats)
        self._users[user.identity] = user
        self._write()
        return True

    @property
    def users(self) -> list[User]:
        return [self._users[k] for k in sorted(self._users)]

    def write(self) -> None:
        """Write ``users.json`` and ``auth.conf`` as they stand."""
        self._write()

    def _write(self) -> None:
        rows = [u.row() for u in self.users]
        _write_atomic(self.directory / "users.json", json.dumps(rows, indent=1))
        # the same public keys alone in a directory of their own, for every process that
        # verifies senders (mesh.transport.keys) to be given without the seeds beside them
        public = self.directory / "public"
        public.mkdir(exist_ok=True, mode=0o755)
        _write_atomic(public / "users.json", json.dumps(rows, indent=1), mode=0o644)
        _write_atomic(
            self.conf_path, "authorization: " + json.dumps(auth_config(self.users), indent=1) + "\n"
        )


def auth_config(users: list[User]) -> dict[str, Any]:
    """nats-server's ``authorization`` block: one NKEY user per identity. No user without a
    key: a client that presents none (or an unknown one) is refused at connect."""
    return {"users": [{"nkey": u.nkey, "permissions": u.permissions.config()} for u in users]}


def _write_creds(path: Path, text: str) -> None:
    """A credentials file (mode 0600) in a directory of its own (mode 0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(path, text)


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)
