"""The conversation record: every process writes down what it sends and what it receives.

Work-queue messages are gone once acknowledged and direct messages are never stored, so
the streams that carry the work cannot tell afterwards what a conversation was. Each mesh
process therefore records, in the ``MESH_RECORD`` stream (its own subjects, overlapping no
work stream; ``MESH_RECORD_RETENTION``):

- **sent**: each message it sends (events, inbox handoffs, direct requests, replies,
  timers), as it went out: the same bytes and headers, signature included, after the
  publish succeeded (a request: before, so the question precedes its answer);
- **received**: each delivery it handled, with its outcome (handled, retry, dead_letter,
  duplicate), the delivery number, the handling time and the model tokens and cost it used.

Both go to ``mesh_record.<conversation>.<writer>``: a writer may record only under its own
name (mesh.transport.auth), so an entry says who wrote it. A message sent by one agent and
handled by another is recorded twice, once by each end: the reader merges them by message
id (mesh.observability.history). Messages from clients that do not record (another
language's NATS client) are still in the record, written by whoever received them.

One path writes both this record and the audit trail (mesh.runtime.audit): `keep`, which
never fails the work it records. The audit waits for the stream's acknowledgement (its
hash chain must know what was stored); the record does not, and costs no wait: an entry is a core NATS
publish into the stream, without waiting for an acknowledgement. It goes out on the same
connection before the acknowledgement of the delivery it belongs to, so an entry lost to a
crash goes with that acknowledgement: the delivery comes again and is recorded then.
Duplicates are dropped by id (``Nats-Msg-Id``). Live-only chunks (``mesh.*.live.>``) are not
recorded: the final answer they add up to is. Secret headers are left out, as in dead
letters (mesh.wire.secrets).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Final

import structlog

from mesh.middleware.publish import REQUEST, Outgoing, PublishMiddleware, Send
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.secrets import is_secret_header

if TYPE_CHECKING:
    from mesh.transport.base import Transport

ENTRY: Final = "Mesh-Record"  # "sent" or "received"
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
        """Record a message this process sent to `subject`."""
        if not self.enabled:
            return
        address = subjects.parse(subject)
        if address is not None and address.kind == subjects.LIVE:
            return
        msg_id = (headers or {}).get(h.ID, "")
        if not msg_id:
            return  # not a mesh message (a raw publish): nothing to merge it by
        entry = {ENTRY: SENT, SUBJECT: subject, h.NATS_MSG_ID: f"{SENT}.{msg_id}"}
        await self._write(_conversation(subject, headers), data, headers, entry)

    async def received(
        self,
        delivery: Any,
        outcome: str,
        *,
        reason: str = "",
        millis: float = 0.0,
        usage: Any = None,
    ) -> None:
        """Record what became of a delivery this process took (`usage`: the model totals of
        its handling, with ``input_tokens``, ``output_tokens`` and ``cost_usd``)."""
        if not self.enabled:
            return
        headers = delivery.headers or {}
        msg_id = headers.get(h.ID, "") or delivery.origin
        if not msg_id or len(msg_id) > 256:
            return  # no way to name it (a malformed direct message): the dead letter has it
        entry = {
            ENTRY: RECEIVED,
            SUBJECT: delivery.subject,
            OUTCOME: outcome,
            DELIVERY: str(delivery.attempt),
            MILLIS: f"{millis:.3f}",
            h.NATS_MSG_ID: f"{RECEIVED}.{self.writer}.{delivery.attempt}.{msg_id}",
        }
        if reason:
            entry[REASON] = _one_line(reason)
        if usage is not None and usage.calls:
            entry[TOKENS] = f"{usage.input_tokens}/{usage.output_tokens}"
            entry[COST] = f"{usage.cost_usd:.6f}"
        await self._write(_conversation(delivery.subject, headers), delivery.data, headers, entry)

    async def _write(
        self, conversation: str, data: bytes, headers: dict[str, str] | None, entry: dict[str, str]
    ) -> None:
        if not conversation:
            return
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
        kept.update(entry)
        room = self.transport.max_payload - _ROOM
        if len(data) > room - 8192 and len(data) > room - sum(len(k) + len(v) for k, v in kept.items()):
            kept[OMITTED] = str(len(data))
            data = b""
        await keep(self.transport, subjects.record_subject(conversation, self.writer), data, kept, wait=False)


def recording(recorder: Recorder) -> PublishMiddleware:
    """Publish middleware: record each message after it is sent (a request, before: its
    answer may be recorded by the one answering before this returns). Put it last, after
    signing, so the record keeps the message as it went out."""

    def middleware(call_next: Send) -> Send:
        async def send(out: Outgoing) -> Any:
            if out.kind == REQUEST:
                await recorder.sent(out.subject, out.data, out.headers)
                return await call_next(out)
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
