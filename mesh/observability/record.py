"""The conversation record: every process writes down what it sends and what it receives.

Work-queue messages are gone once acknowledged and direct messages are never stored, so
the streams that carry the work cannot tell afterwards what a conversation was. Each mesh
process therefore records, in the ``MESH_RECORD`` stream (its own subjects, overlapping no
work stream; ``MESH_RECORD_RETENTION``), on ``mesh_record.<conversation>.<writer>``:

- **a handling** (``Mesh-Record: handling``): one entry per delivery an agent settled: the
  message as it took it, what became of it (handled, retry, dead_letter, duplicate), the
  delivery number, the handling time, the model tokens and cost it used, and every message
  the handler sent meanwhile, as it went out (signature included);
- **sent** (``Mesh-Record: sent``): a message sent outside any handling (a client's), as it
  went out.

A writer may record only under its own name (mesh.transport.auth), so an entry says who
wrote it. A message sent by one agent and handled by another is in two entries, one by each
end: the reader merges them by message id (mesh.observability.history). Messages from
clients that do not record (another language's NATS client) are in the record all the
same, in the handling of whoever took them. One entry per handling, not one per message:
each entry is a message the server stores, and that is most of what recording costs.

One path writes both this record and the audit trail (mesh.runtime.audit): `keep`, which
never fails the work it records. The audit waits for the stream's acknowledgement (its hash
chain must know what was stored); the record does not, and costs no wait: an entry is a
core NATS publish into the stream. A handling's entry goes out on the connection that then
acknowledges the delivery, so an entry lost to a crash goes with that acknowledgement: the
delivery comes again and is recorded then. Copies are dropped by id (``Nats-Msg-Id``).
Live-only chunks (``mesh.*.live.>``) are not recorded: the final answer they add up to is.
Secret headers are left out, as in dead letters (mesh.wire.secrets).
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

ENTRY: Final = "Mesh-Record"  # "handling", "sent" (or "received": a handling without its sends)
SUBJECT: Final = "Mesh-Record-Subject"  # where the message went
OUTCOME: Final = "Mesh-Record-Outcome"  # received: handled, retry, dead_letter, duplicate
REASON: Final = "Mesh-Record-Reason"  # why, for a retry or a dead letter
DELIVERY: Final = "Mesh-Record-Delivery"  # received: which delivery of the message it was
MILLIS: Final = "Mesh-Record-Ms"  # received: handling time
TOKENS: Final = "Mesh-Record-Tokens"  # received: model tokens used, "<input>/<output>"
COST: Final = "Mesh-Record-Cost"  # received: model cost, USD
OMITTED: Final = "Mesh-Record-Omitted"  # the body's size, when it did not fit beside the headers

SENT: Final = "sent"
RECEIVED: Final = "received"
HANDLING: Final = "handling"
HANDLED: Final = "handled"
RETRY: Final = "retry"
DEAD_LETTER: Final = "dead_letter"
DUPLICATE: Final = "duplicate"
OUTCOMES: Final = (HANDLED, RETRY, DEAD_LETTER, DUPLICATE)

_ROOM: Final = 2048  # bytes kept free beside a recorded message for the entry's own headers
_REASON_MAX: Final = 500
_VERDICTS: Final = 1024  # header names whose verdict a recorder remembers

log = structlog.get_logger("mesh.record")


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


class Copy(msgspec.Struct, array_like=True, frozen=True):
    """A message as recorded: where it went, its headers (no secret ones) and its body."""

    subject: str
    headers: dict[str, str]
    data: bytes


class Handled(msgspec.Struct, array_like=True, frozen=True):
    """The body of a handling entry: the message taken, and what was sent meanwhile."""

    received: Copy
    sent: list[Copy] = []


encode_handled = msgspec.msgpack.Encoder().encode
decode_handled = msgspec.msgpack.Decoder(Handled).decode


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

    __slots__ = ("_secret", "_verdicts", "enabled", "transport", "writer")

    def __init__(
        self,
        transport: Transport,
        writer: str,
        *,
        secret_headers: Collection[str] = (),
        enabled: bool = True,
    ) -> None:
        self.transport = transport
        self.writer = subjects.agent_name(writer)
        self._secret = frozenset(secret_headers)
        self._verdicts: dict[str, bool] = {}  # header name -> left out (secret, or the entry's own)
        self.enabled = enabled

    async def sent(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        """Record a message this process sent to `subject`: into the entry of the handling
        it was sent from, or an entry of its own."""
        if not self.enabled:
            return
        address = subjects.parse(subject)
        if address is not None and address.kind == subjects.LIVE:
            return
        msg_id = (headers or {}).get(h.ID, "")
        if not msg_id:
            return  # not a mesh message (a raw publish): nothing to merge it by
        sends = _sends.get()
        if sends is not None and sends.open:
            sends.copies.append(Copy(subject, self._kept(headers), data))
            return
        await self._single(Copy(subject, self._kept(headers), data))

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
                await self._single(copy)
            return
        conversation = _conversation(delivery.subject, headers)
        entry = {
            ENTRY: HANDLING,
            SUBJECT: delivery.subject,
            OUTCOME: outcome,
            DELIVERY: str(delivery.attempt),
            MILLIS: f"{millis:.3f}",
            h.ID: msg_id,
            h.NATS_MSG_ID: f"{HANDLING}.{self.writer}.{delivery.attempt}.{msg_id}",
        }
        if reason:
            entry[REASON] = _one_line(reason)
        if usage is not None and usage.calls:
            entry[TOKENS] = f"{usage.input_tokens}/{usage.output_tokens}"
            entry[COST] = f"{usage.cost_usd:.6f}"
        received = Copy(delivery.subject, self._kept(headers), delivery.data)
        room = self.transport.max_payload - _ROOM
        size = (
            len(received.data) + sum(len(c.data) + _size(c.headers) for c in copies) + _size(received.headers)
        )
        if size > room:  # too large together: each send on its own, and the body if it fits
            for copy in copies:
                await self._single(copy)
            copies = []
            if size > room and len(received.data) > room - _size(received.headers):
                entry[OMITTED] = str(len(received.data))
                received = Copy(received.subject, received.headers, b"")
        data = encode_handled(Handled(received, copies))
        await self._publish(conversation, data, entry)

    async def _single(self, copy: Copy) -> None:
        msg_id = copy.headers.get(h.ID, "")
        entry = {**copy.headers, ENTRY: SENT, SUBJECT: copy.subject, h.NATS_MSG_ID: f"{SENT}.{msg_id}"}
        data = copy.data
        if len(data) > self.transport.max_payload - _ROOM - _size(entry):
            entry[OMITTED] = str(len(data))
            data = b""
        await self._publish(_conversation(copy.subject, copy.headers), data, entry)

    async def _publish(self, conversation: str, data: bytes, headers: dict[str, str]) -> None:
        if conversation:
            subject = subjects.record_subject(conversation, self.writer)
            await keep(self.transport, subject, data, headers, wait=False)

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


def _size(headers: dict[str, str]) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.items())


def _conversation(subject: str, headers: dict[str, str] | None) -> str:
    """The conversation a message belongs to, if it is a valid id: from the subject, or
    from its headers for a reply to an ``_INBOX``."""
    address = subjects.parse(subject)
    conv = address.conversation if address is not None else (headers or {}).get(h.CONVERSATION, "")
    return conv if subjects.is_conversation_id(conv) else ""


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _REASON_MAX else flat[: _REASON_MAX - 3] + "..."
