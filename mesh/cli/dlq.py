"""Reading and re-driving dead letters (`mesh dlq`).

A dead letter is stored in the dead-letter stream with the original bytes and headers plus
``Mesh-Dlq-*`` headers. Re-driving one republishes the original message to the inbox of the
agent that gave up on it, with a new ``Nats-Msg-Id`` (so stream dedupe lets it in) and
without its deadline (a person decided it is still worth doing), then removes the dead
letter. Secret headers were left out when the letter was stored (``Mesh-Dlq-Masked`` names
them); re-driving never brings them back, and drops any a letter carries all the same (one
published by hand).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import click
import nats.js.errors

from mesh.runtime.audit import AuditLog
from mesh.runtime.deadletter import CONTINUATION
from mesh.transport.keys import signer_of
from mesh.transport.nats import NatsTransport
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.envelope import new_id
from mesh.wire.errors import ConfigError
from mesh.wire.secrets import is_secret_header
from mesh.wire.settings import Settings
from mesh.wire.signature import SIGNATURE, Signer

OPERATOR_SENDER = "operator"  # who a signed re-drive is from (a role's name, never an agent's)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    subject: str
    agent: str
    conversation: str
    kind: str
    reason: str
    type: str
    message_id: str
    at_ns: int
    deliveries: int
    original_subject: str
    truncated: int = 0  # the body's full size, if the rest is in a continuation letter


def _read(raw: Any) -> DeadLetter:
    hd = raw.headers or {}
    address = subjects.parse(raw.subject)
    return DeadLetter(
        seq=int(raw.seq or 0),
        subject=raw.subject,
        agent=hd.get(h.DLQ_AGENT, address.target if address else ""),
        conversation=address.conversation if address else "",
        kind=hd.get(h.DLQ_KIND, ""),
        reason=hd.get(h.DLQ_REASON, ""),
        type=hd.get(h.TYPE, ""),
        message_id=hd.get(h.ID, ""),
        at_ns=_int(hd.get(h.DLQ_AT)),
        deliveries=_int(hd.get(h.DLQ_DELIVERIES)) or 1,
        original_subject=hd.get(h.DLQ_SUBJECT, ""),
        truncated=_int(hd.get(h.DLQ_TRUNCATED)),
    )


def _int(raw: str | None) -> int:
    """A number from a dead letter's header; anyone can publish on a dead-letter subject."""
    try:
        return int(raw or 0) if len(raw or "") <= h.MAX_INT else 0
    except ValueError:
        return 0


async def list_dead_letters(
    transport: NatsTransport, stream: str, *, agent: str = "", conversation: str = "", limit: int = 50
) -> list[DeadLetter]:
    """The newest `limit` dead letters, oldest first, optionally of one agent/conversation."""
    pattern = f"{subjects.ROOT}.{conversation or '*'}.{subjects.DEAD_LETTER}.{agent or '*'}"
    found: list[DeadLetter] = []
    seq = 1
    while (raw := await transport.stored_next(stream, seq, pattern)) is not None:
        found.append(_read(raw))
        found = found[-limit:]
        seq = int(raw.seq or 0) + 1
    return found


async def get_dead_letter(transport: NatsTransport, stream: str, seq: int) -> Any:
    try:
        return await transport.stored(stream, seq)
    except nats.js.errors.NotFoundError:
        raise ConfigError(f"no dead letter {seq} in {stream}: `mesh dlq ls` lists them") from None


@dataclass(frozen=True, slots=True)
class Redriven:
    subject: str  # the inbox it went to
    without: tuple[str, ...]  # secret headers it went without (masked, or dropped now)


def redrive_headers(headers: dict[str, str], secret_headers: frozenset[str] = frozenset()) -> dict[str, str]:
    """The original headers back, minus dead-letter bookkeeping, the deadline and any
    secret header (`secret_headers`: more names, lower-case, from MESH_SECRET_HEADERS)."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        if is_secret_header(name, secret_headers):
            continue
        if name.startswith(h.DLQ_ORIGINAL_PREFIX):
            original = name[len(h.DLQ_ORIGINAL_PREFIX) :]
            if original.lower() != h.NATS_MSG_ID.lower():
                out[original] = value
        elif not name.startswith("Mesh-Dlq-") and name != h.DEADLINE:
            out[name] = value
    out[h.NATS_MSG_ID] = h.new_id()
    return out


def left_out(headers: dict[str, str], secret_headers: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """The secret headers a re-driven letter goes without: those masked when it was stored,
    and any it carries all the same."""
    masked = {n.strip() for n in headers.get(h.DLQ_MASKED, "").split(",") if n.strip()}
    masked.update(n for n in headers if is_secret_header(n, secret_headers))
    return tuple(sorted(masked))


async def continuation(transport: NatsTransport, stream: str, raw: Any) -> Any:
    """The continuation letter holding the rest of truncated dead letter `raw`."""
    letter_id = (raw.headers or {}).get(h.DLQ_ID, "")
    seq = int(raw.seq or 0) + 1
    while (nxt := await transport.stored_next(stream, seq, raw.subject)) is not None:
        hd = nxt.headers or {}
        if hd.get(h.DLQ_KIND) == CONTINUATION and hd.get(h.DLQ_OF) == letter_id:
            return nxt
        seq = int(nxt.seq or 0) + 1
    raise ConfigError(f"the rest of dead letter {raw.seq} ({h.DLQ_OF}: {letter_id}) is not in {stream}")


async def redrive(
    transport: NatsTransport,
    stream: str,
    seq: int,
    *,
    keep: bool = False,
    secret_headers: frozenset[str] = frozenset(),
    signer: Signer | None = None,
    audit: AuditLog | None = None,
) -> Redriven:
    """Send dead letter `seq` back to its agent's inbox, without secret headers: where it
    went, and which it went without. With a `signer` (the operator's identity, on a mesh
    with identities) it goes as a new message from the operator, signed: the original
    sender's signature cannot be carried over (its id was seen, its time is past).
    Recorded in `audit` when given."""
    raw = await get_dead_letter(transport, stream, seq)
    letter = _read(raw)
    if letter.kind == CONTINUATION:
        raise ConfigError(f"dead letter {seq} is the rest of a truncated one: re-drive that one instead")
    if letter.kind == "bad_subject":
        raise ConfigError(
            f"dead letter {seq} came on a subject that is not a mesh subject ({letter.original_subject!r}); "
            f"it has no conversation to go back to. Publish a corrected copy instead (`mesh dlq show {seq}`)"
        )
    if not subjects.is_agent_name(letter.agent) or not subjects.is_conversation_id(letter.conversation):
        raise ConfigError(f"dead letter {seq} does not say which agent rejected it; it cannot be re-driven")
    data, rest = raw.data, None
    if letter.truncated:
        rest = await continuation(transport, stream, raw)
        data = raw.data + rest.data
    target = subjects.Address.inbox(letter.conversation, letter.agent).subject
    headers = dict(raw.headers or {})
    out = redrive_headers(headers, secret_headers)
    if signer is not None:
        out.pop(SIGNATURE, None)
        out[h.REDRIVEN_FROM] = out.get(h.SENDER, "")
        out[h.ID] = out[h.NATS_MSG_ID]
        out[h.SENDER] = OPERATOR_SENDER
        out[h.SENT_AT] = str(h.now_ns())
        signer.sign(target, out, data)
    await transport.store(target, data, out)
    if audit is not None:
        await audit.append(
            "redrive",
            actor=audit.writer,
            conversation=letter.conversation,
            detail={"seq": seq, "kind": letter.kind, "agent": letter.agent, "message": headers.get(h.ID, "")},
        )
    if not keep:
        await transport.delete_stored(stream, seq)
        if rest is not None:
            await transport.delete_stored(stream, int(rest.seq))
    return Redriven(target, left_out(headers, secret_headers))


# ------------------------------------------------------------------ CLI


def register(cli: click.Group, settings_fn: Any, run: Any) -> None:
    @cli.group()
    def dlq() -> None:
        """Dead letters: list, show, re-drive."""

    async def connect() -> tuple[NatsTransport, Settings]:
        settings = settings_fn()
        return await NatsTransport.connect(settings, "mesh-dlq"), settings

    @dlq.command("ls")
    @click.option("--agent", default="", help="Only this agent's dead letters.")
    @click.option("--conversation", default="", help="Only this conversation's.")
    @click.option("--limit", default=50, show_default=True, help="The newest N.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter.")
    def ls(agent: str, conversation: str, limit: int, as_json: bool) -> None:
        """List dead letters, oldest first."""
        if agent:
            subjects.agent_name(agent)
        if conversation:
            subjects.conversation_id(conversation)

        async def go() -> None:
            transport, settings = await connect()
            try:
                letters = await list_dead_letters(
                    transport,
                    settings.dead_letter_stream,
                    agent=agent,
                    conversation=conversation,
                    limit=limit,
                )
            finally:
                await transport.close()
            if as_json:
                for d in letters:
                    click.echo(json.dumps(asdict(d)))
                return
            if not letters:
                click.echo("no dead letters")
                return
            click.echo(f"{'SEQ':>6}  {'AGENT':<14}{'KIND':<18}{'TRIES':>5}  {'CONVERSATION':<24}REASON")
            for d in letters:
                click.echo(
                    f"{d.seq:>6}  {d.agent:<14}{d.kind:<18}{d.deliveries:>5}  {d.conversation:<24}"
                    f"{d.reason[:80]}"
                )

        run(go)

    @dlq.command("show")
    @click.argument("seq", type=int)
    def show(seq: int) -> None:
        """Print one dead letter: its headers and body."""

        async def go() -> None:
            transport, settings = await connect()
            try:
                raw = await get_dead_letter(transport, settings.dead_letter_stream, seq)
            finally:
                await transport.close()
            click.echo(f"subject: {raw.subject}")
            for name, value in sorted((raw.headers or {}).items()):
                click.echo(f"{name}: {value}")
            full = _read(raw).truncated
            if full:
                letter_id = (raw.headers or {}).get(h.DLQ_ID)
                click.echo(
                    f"\n(the body below is the first {len(raw.data)} of {full} bytes; the rest is the "
                    f"continuation letter whose {h.DLQ_OF} is {letter_id}: `mesh dlq redrive` joins them)"
                )
            click.echo("")
            click.echo(raw.data.decode("utf-8", "replace"))

        run(go)

    @dlq.command("redrive")
    @click.argument("seq", type=int)
    @click.option("--keep", is_flag=True, help="Keep the dead letter after re-driving it.")
    def redrive_cmd(seq: int, keep: bool) -> None:
        """Send a dead letter back to the agent that gave up on it."""

        async def go() -> None:
            transport, settings = await connect()
            try:
                done = await redrive(
                    transport,
                    settings.dead_letter_stream,
                    seq,
                    keep=keep,
                    secret_headers=settings.secret_header_names,
                    signer=signer_of(settings),
                    audit=AuditLog(transport, "mesh-dlq", new_id()),
                )
            finally:
                await transport.close()
            click.echo(f"re-drove dead letter {seq} to {done.subject}")
            if done.without:
                click.echo(
                    f"without its secret headers {', '.join(done.without)}: their values were not kept "
                    f"in the dead letter; the agent gets the message without them"
                )

        run(go)
