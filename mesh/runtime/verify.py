"""Verifying signed envelopes: a message is acted on only if it comes from who it says.

A delivery passes when
- its signature (`mesh.wire.signature`) is valid over its subject, mesh headers and body;
- the signer's key belongs to a known identity (`mesh.transport.keys.KeyDirectory`), and
  ``Mesh-Sender`` is that identity: an agent's key signs only as that agent's name; a
  role's key (a person, a tool) signs as any name that is not an agent's;
- its ``Mesh-Sent-At`` is within the replay window of the time the stream stored it (of now,
  for a direct message);
- its ``Mesh-Id`` was not seen in the window on another message (a redelivery of the same
  stored message is not a replay: it has the same stream sequence; an identical copy stored
  at another sequence, by a replay or by a stream that stored one publish twice across a
  leader change, is skipped as a duplicate (`Copy`), never handled twice); a direct message's id
  also not by another replica of the agent (`SeenIds`, the ``MESH_SEEN`` bucket: a stored
  message's copies are caught by the stream's dedupe and the processed records);
- its reply target (``Mesh-Reply-To``, or the NATS reply subject of a direct request) lies in
  the reply space of its signer, or of the signer of its ``Mesh-Reply-Grant`` for this
  conversation (`owns`): whoever passes work on answers the one who asked, no one else.

Anything else is `unauthenticated`, with a reason that names what failed (never a key's
secret half, which the verifier does not have).
"""

from __future__ import annotations

import time
from collections import OrderedDict

from mesh.transport.delivery import Delivery
from mesh.transport.keys import KeyDirectory, directory_of
from mesh.transport.state import StateStore
from mesh.transport.streams import id_key
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.errors import DeliveryError
from mesh.wire.settings import Settings
from mesh.wire.signature import REPLY_GRANT, SIGNATURE, BadSignature, check_grant, verify

UNAUTHENTICATED = "unauthenticated"
UNAUTHORIZED = "unauthorized"
# refused for who sent a message or where it asks to be answered: nothing proves the reply
# subject is the sender's, so no failure answer goes there
UNPROVEN = frozenset({UNAUTHENTICATED, UNAUTHORIZED})


class Copy(Exception):
    """A stored message identical (same id, same signature) to one taken in the window, at
    another stream sequence: skipped as a duplicate, as the duplicate guard skips one."""


MAX_SEEN = 1_000_000  # ids remembered at most (the oldest are forgotten first)


class Verifier:
    def __init__(self, directory: KeyDirectory, window: float) -> None:
        self.directory = directory
        self.window_ns = int(window * 1e9)
        # id -> (origin, when, signature)
        self._seen: OrderedDict[str, tuple[str, int, str]] = OrderedDict()

    def check(self, d: Delivery) -> str:
        """The identity `d` comes from; DeliveryError(unauthenticated) if it cannot be proven."""
        headers = d.headers or {}
        try:
            signer = verify(d.subject, headers, d.data)
        except BadSignature as exc:
            raise DeliveryError(UNAUTHENTICATED, str(exc)) from None
        identity = self.directory.identity(signer)
        if identity is None:
            raise DeliveryError(UNAUTHENTICATED, f"the signer {signer} is not a known identity")
        sender = headers.get(h.SENDER, "")
        kind, name = identity.split(":", 1)
        if kind == "agent" and sender != name:
            raise DeliveryError(
                UNAUTHENTICATED, f"Mesh-Sender {sender[: h.MAX_NAME]!r} is not the signer, agent {name!r}"
            )
        if kind != "agent" and self.directory.is_agent(sender):
            raise DeliveryError(
                UNAUTHENTICATED, f"Mesh-Sender {sender!r} is an agent, but the signer is {identity!r}"
            )
        self._fresh(d, headers)
        for target in (headers.get(h.REPLY_TO, ""), "" if d.stored else d.reply):
            if target and not owns(identity, signer, target):
                self._granted(d, headers, target)
        return identity

    def _granted(self, d: Delivery, headers: dict[str, str], target: str) -> None:
        """A reply target outside the signer's space needs the grant of its owner."""
        grant = headers.get(REPLY_GRANT, "")
        where = f"the reply target {target[:80]!r}"
        if not grant:
            raise DeliveryError(
                UNAUTHORIZED, f"{where} is not the signer's, and no {REPLY_GRANT} of its owner came with it"
            )
        address = subjects.parse(d.subject)
        conversation = address.conversation if address is not None else headers.get(h.CONVERSATION, "")
        try:
            key = check_grant(grant, conversation)
        except BadSignature as exc:
            raise DeliveryError(UNAUTHORIZED, f"{where}: {exc}") from None
        granter = self.directory.identity(key)
        if granter is None or not owns(granter, key, target):
            raise DeliveryError(
                UNAUTHORIZED, f"{where} is not in the reply space of its grant's signer {granter or key}"
            )

    def _fresh(self, d: Delivery, headers: dict[str, str]) -> None:
        now = time.time_ns()
        raw = headers.get(h.SENT_AT, "")
        if not raw.isdigit() or len(raw) > h.MAX_INT:
            raise DeliveryError(UNAUTHENTICATED, "a signed message needs Mesh-Sent-At (Unix nanoseconds)")
        at = getattr(d, "stored_ns", 0) or now  # when the stream stored it, else when it came
        off = (at - int(raw)) / 1e9
        if abs(off) * 1e9 > self.window_ns:
            when = "before" if off > 0 else "after"
            raise DeliveryError(
                UNAUTHENTICATED,
                f"Mesh-Sent-At is {abs(off):.0f}s {when} the message arrived; the window is "
                f"{self.window_ns / 1e9:g}s (MESH_REPLAY_WINDOW): a replay, or a clock far off",
            )
        msg_id = headers.get(h.ID, "")
        if not msg_id:
            raise DeliveryError(UNAUTHENTICATED, "a signed message needs Mesh-Id")
        seen = self._seen
        while seen:  # forget what is past the window
            oldest = next(iter(seen.values()))
            if now - oldest[1] <= self.window_ns and len(seen) < MAX_SEEN:
                break
            seen.popitem(last=False)
        before = seen.get(msg_id)
        signature = headers.get(SIGNATURE, "")
        if before is None:
            seen[msg_id] = (d.origin, now, signature)
        elif not (d.stored and before[0] == d.origin):
            if d.stored and before[2] == signature:
                raise Copy
            raise DeliveryError(
                UNAUTHENTICATED, f"message id {msg_id[: h.MAX_ID]!r} was seen before (a replay)"
            )


class SeenIds:
    """The ids of the signed direct messages an agent took, shared by all its replicas: a
    direct message replayed to another replica within the window is refused there too."""

    def __init__(self, store: StateStore, agent: str) -> None:
        self.store = store
        self.prefix = f"{agent}."

    async def first(self, d: Delivery) -> None:
        """Record `d`'s id; DeliveryError(unauthenticated) if a replica recorded it already."""
        msg_id = (d.headers or {}).get(h.ID, "")
        if await self.store.create(self.prefix + id_key(msg_id), b"") is None:
            raise DeliveryError(
                UNAUTHENTICATED,
                f"message id {msg_id[: h.MAX_ID]!r} was taken before by a replica of this agent (a replay)",
            )


def owns(identity: str, key: str, target: str) -> bool:
    """Whether reply target `target` is in the reply space of `identity` (public key `key`):
    its own ``_INBOX.<key>.`` prefix; for an agent, its inbox and direct line in any
    conversation; for a role (a person, a tool outside the mesh), reply and event subjects."""
    if target.startswith("_INBOX."):
        return target.startswith(f"_INBOX.{key}.")
    address = subjects.parse(target)
    if address is None:
        return False
    kind, _, name = identity.partition(":")
    if kind == "agent":
        return address.kind in (subjects.AGENT, subjects.DIRECT) and address.target == name
    return address.kind in (subjects.REPLY, subjects.EVENT)


def verifier_of(settings: Settings) -> Verifier | None:
    """The verifier of a process with an identity of its own; None on an insecure mesh."""
    directory = directory_of(settings)
    return Verifier(directory, settings.replay_window) if directory is not None else None
