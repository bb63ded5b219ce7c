"""The conversation record: every process writes down what it sends and what it receives.

Work-queue messages are gone once acknowledged and direct messages are never stored, so
the streams that carry the work cannot tell afterwards what a conversation was. Each mesh
process therefore records, in the ``MESH_RECORD`` stream (its own subjects, overlapping no
work stream; ``MESH_RECORD_RETENTION``), on ``mesh_record.<conversation>.<writer>``, one
`Entry` per:

- **handling**: a delivery an agent settled: the message as it took it, what became of it
  (handled, retry, dead_letter, duplicate), the delivery number, the handling time, the
  model tokens and cost it used, and every message the handler sent meanwhile, as it went
  out (signature included);
- **send outside a handling** (a client's): the message as it went out. A client leaves
  what it sends to an agent (its inbox, direct line or timers) to that agent's handling,
  and records the rest (events, answers): one entry fewer per message it starts.

A writer may record only under its own name (mesh.transport.auth), so an entry says who
wrote it. A message sent by one agent and handled by another is in two entries, one by each
end: the reader merges them by message id (mesh.observability.history). Messages from
clients that do not record (another language's NATS client) are in the record all the
same, in the handling of whoever took them.

What recording costs is the entries, so there are few and they are cheap: one per handling,
not one per message, and everything in its msgpack body (`Entry`), beside one header, its
``Nats-Msg-Id`` (a second copy is dropped).

One path writes both this record and the audit trail (mesh.runtime.audit): `keep`, which
never fails the work it records. The audit waits for the stream's acknowledgement (its hash
chain must know what was stored); the record does not, and costs no wait: an entry is a
core NATS publish into the stream. A handling's entry goes out on the connection that then
acknowledges the delivery, so an entry lost to a crash goes with that acknowledgement: the
delivery comes again and is recorded then. Live-only chunks (``mesh.*.live.>``) are not
recorded: the final answer they add up to is. Secret headers are left out, as in dead
letters (mesh.wire.secrets).
"""

from __future__ import annotations

import contextvars
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog

from mesh.middleware.publish import REQUEST, Outgoing, PublishMiddleware, Send
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.secrets import is_secret_header

if TYPE_CHECKING:
    from mesh.transport.base import Transport

HANDLED: Final = "handled"
RETRY: Final = "retry"
DEAD_LETTER: Final = "dead_letter"
DUPLICATE: Final = "duplicate"
OUTCOMES: Final = (HANDLED, RETRY, DEAD_LETTER, DUPLICATE)

_NOT_HERE: Final = frozenset({subjects.LIVE, subjects.AGENT, subjects.DIRECT, subjects.TIMER})
_ROOM: Final = 1024  # bytes kept free beside an entry's body for its header and the protocol's
_REASON_MAX: Final = 500
_VERDICTS: Final = 1024  # header names whose verdict a recorder remembers

log = structlog.get_logger("mesh.record")


class Copy(msgspec.Struct, array_like=True, frozen=True):
    """A message as recorded: where it went, its headers (no secret ones) and its body."""

    subject: str
    headers: dict[str, str]
    data: bytes


class Entry(msgspec.Struct, array_like=True, frozen=True, kw_only=True):
    """One entry of the record (msgpack, as an array): a handling, with the message taken
    (`received`) and what became of it, or a send outside any handling (`received` None).
    `sent`: the messages sent, as they went out. `omitted`: the size of a body left out,
    too large to record beside the rest."""

    received: Copy | None = None
    sent: list[Copy] = []
    outcome: str = ""
    reason: str = ""
    delivery: int = 0
    millis: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    omitted: int = 0


encode_entry = msgspec.msgpack.Encoder().encode
decode_entry = msgspec.msgpack.Decoder(Entry).decode


async def keep(
    transport: Transport,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
    *,
    wait: bool,
    what: str = "record entry",
) -> bool:
    """Store a record of something that happened: with `wait`, until the stream acknowledges
    it; else published at once. False (and a warning) if it could not be: a record is never
    worth failing the work it records."""
    try:
        if wait:
            await transport.store(subject, data, headers)
        else:
            await transport.publish(subject, data, headers)
    except Exception as exc:
        log.warning(f"{what} not stored", subject=subject, error=str(exc))
        return False
    return True


class _Sends:
    """What a handler sends while it runs, kept for its handling's entry; once the handling
    is recorded (`open` False), a late send (a task the handler left behind) is recorded
    on its own."""

    __slots__ = ("copies", "open")

    def __init__(self) -> None:
        self.copies: list[Copy] = []
        self.open = True


_sends: contextvars.ContextVar[_Sends | None] = contextvars.ContextVar("mesh_record_sends", default=None)


class Recorder:
    """Writes one process's entries (`writer`: its identity's name) into the record."""

    __slots__ = ("_secret", "_verdicts", "enabled", "leave_to_agents", "transport", "writer")

    def __init__(
        self,
        transport: Transport,
        writer: str,
        *,
        secret_headers: Collection[str] = (),
        enabled: bool = True,
        leave_to_agents: bool = False,
    ) -> None:
        self.transport = transport
        # a client's: what it sends to an agent's inbox, direct line or timers is recorded by
        # the agent that takes it, in its handling; only the rest (events, answers) here
        self.leave_to_agents = leave_to_agents
        self.writer = subjects.agent_name(writer)
        self._secret = frozenset(secret_headers)
        self._verdicts: dict[str, bool] = {}  # header name -> left out (secret, or the stream's own)
        self.enabled = enabled

    async def sent(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Record a message this process sent to `subject`: into the entry of the handling
        it was sent from, or an entry of its own."""
        if not self.enabled:
            return
        address = subjects.parse(subject)
        if (
            address is not None
            and address.kind in _NOT_HERE
            and (address.kind == subjects.LIVE or self.leave_to_agents)
        ):
            return
        msg_id = (headers or {}).get(h.ID, "")
        if not msg_id:
            return  # not a mesh message (a raw publish): nothing to merge it by
        copy = Copy(subject, self._kept(headers), data)
        sends = _sends.get()
        if sends is not None and sends.open:
            sends.copies.append(copy)
        else:
            await self._write(_conversation(subject, headers), f"sent.{msg_id}", Entry(sent=[copy]))

    def handling(self) -> contextvars.Token[_Sends | None]:
        """Start keeping what is sent, for the entry of the handling that starts here."""
        return _sends.set(_Sends())

    async def handled(
        self,
        token: contextvars.Token[_Sends | None],
        delivery: Any,
        outcome: str,
        *,
        reason: str = "",
        millis: float = 0.0,
        usage: Any = None,
    ) -> None:
        """Record a handling: what became of `delivery` ("" if nothing did yet: only its
        sends are recorded), with what was sent since `handling` (`usage`: the model totals
        of the handling, with ``calls``, ``input_tokens``, ``output_tokens``, ``cost_usd``)."""
        sends = _sends.get()
        _sends.reset(token)
        copies = sends.copies if sends is not None else []
        if sends is not None:
            sends.open = False
        headers = delivery.headers or {}
        msg_id = headers.get(h.ID, "") or delivery.origin
        if not outcome or not msg_id or len(msg_id) > 256:
            for copy in copies:  # no handling to put them in (a timer not due, a bad id)
                await self._write(_conversation(copy.subject, copy.headers), "", Entry(sent=[copy]))
            return
        used = usage is not None and usage.calls
        entry = Entry(
            received=Copy(delivery.subject, self._kept(headers), delivery.data),
            sent=copies,
            outcome=outcome,
            reason=_one_line(reason) if reason else "",
            delivery=delivery.attempt,
            millis=round(millis, 3),
            input_tokens=usage.input_tokens if used else 0,
            output_tokens=usage.output_tokens if used else 0,
            cost_usd=usage.cost_usd if used else 0.0,
        )
        conversation = _conversation(delivery.subject, headers)
        await self._write(conversation, f"handling.{self.writer}.{delivery.attempt}.{msg_id}", entry)

    async def _write(self, conversation: str, msg_id: str, entry: Entry) -> None:
        """Publish `entry`; one too large goes as a handling without its sends, each send
        on its own, and the message taken without its body if that is still too large."""
        if not conversation:
            return
        data = encode_entry(entry)
        room = self.transport.max_payload - _ROOM
        if len(data) > room:
            for copy in entry.sent if entry.received is not None else []:
                await self._write(_conversation(copy.subject, copy.headers), "", Entry(sent=[copy]))
            received, sent = entry.received, entry.sent
            if received is not None:
                sent = []
                if len(received.data) > room // 2:
                    entry = msgspec.structs.replace(entry, omitted=len(received.data))
                    received = Copy(received.subject, received.headers, b"")
            elif sent and len(sent[0].data) > room // 2:
                sent = [Copy(sent[0].subject, sent[0].headers, b"")]
                entry = msgspec.structs.replace(entry, omitted=len(entry.sent[0].data))
            data = encode_entry(msgspec.structs.replace(entry, received=received, sent=sent))
            if len(data) > room:
                log.warning("record entry too large even without bodies", conversation=conversation)
                return
        subject = subjects.record_subject(conversation, self.writer)
        await keep(self.transport, subject, data, {h.NATS_MSG_ID: msg_id} if msg_id else None, wait=False)

    def _kept(self, headers: dict[str, str] | None) -> dict[str, str]:
        """`headers` without the secret ones (and the stream's own ``Nats-Msg-Id``)."""
        kept: dict[str, str] = {}
        verdicts = self._verdicts
        for name, value in (headers or {}).items():
            secret = verdicts.get(name)
            if secret is None:
                secret = is_secret_header(name, self._secret) or name == h.NATS_MSG_ID
                if len(verdicts) < _VERDICTS:  # names come from the wire: a bounded cache
                    verdicts[name] = secret
            if not secret:
                kept[name] = value
        return kept


def recording(recorder: Recorder) -> PublishMiddleware:
    """Publish middleware: record each message once it is sent (a request, once it is
    answered or not). Put it last, after signing, so the record keeps the message as it
    went out."""

    def middleware(call_next: Send) -> Send:
        async def send(out: Outgoing) -> Any:
            if out.kind == REQUEST:
                try:
                    return await call_next(out)
                finally:
                    await recorder.sent(out.subject, out.data, out.headers)
            result = await call_next(out)
            await recorder.sent(out.subject, out.data, out.headers)
            return result

        return send

    return middleware


def _conversation(subject: str, headers: dict[str, str] | None) -> str:
    """The conversation a message belongs to, if it is a valid id: from the subject, or
    from its headers for a reply to an ``_INBOX``."""
    address = subjects.parse(subject)
    conv = address.conversation if address is not None else (headers or {}).get(h.CONVERSATION, "")
    return conv if subjects.is_conversation_id(conv) else ""


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _REASON_MAX else flat[: _REASON_MAX - 3] + "..."
