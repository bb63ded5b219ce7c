"""Watching the mesh: decode each message seen on a subject pattern into a `TapLine`.

A tap is a plain (non-queue) subscription, so it sees copies and never takes work away
from agents.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec

from mesh.transport.base import Subscription, Transport
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import MSGPACK

PREVIEW = 96


@dataclass(frozen=True, slots=True)
class TapLine:
    """One observed message."""

    seen_ns: int
    sent_ns: int
    subject: str
    sender: str
    receiver: str
    type: str
    conversation: str
    id: str
    causation: str
    hop: int
    latency_ms: float | None
    trace_id: str
    size: int
    preview: str
    dead_letter: str  # the reason, for dead letters
    body: Any = None  # the whole decoded body, when asked for
    gathers: tuple[str, ...] = ()  # a join's output: the ids of the answers it gathered

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def observe(msg: Any, seen_ns: int | None = None, *, full: bool = False) -> TapLine:
    """Describe a raw delivery; never raises on bad input (a tap must see garbage too)."""
    seen = seen_ns or time.time_ns()
    headers = msg.headers or {}
    address = subjects.parse(msg.subject)
    sent = _int(headers.get(h.SENT_AT))
    traceparent = headers.get(h.TRACEPARENT, "")
    parts = traceparent.split("-")
    type_name = headers.get(h.TYPE) or (address.target if address and address.kind == subjects.EVENT else "?")
    return TapLine(
        seen_ns=seen,
        sent_ns=sent,
        subject=msg.subject,
        sender=headers.get(h.SENDER, "?"),
        receiver=address.receiver if address else msg.subject,
        type=type_name,
        conversation=address.conversation if address else headers.get(h.CONVERSATION, ""),
        id=headers.get(h.ID) or headers.get(h.NATS_MSG_ID, ""),
        causation=headers.get(h.CAUSATION, ""),
        hop=_int(headers.get(h.HOP)),
        latency_ms=round((seen - sent) / 1e6, 3) if sent else None,
        trace_id=parts[1] if len(parts) == 4 else "",
        size=len(msg.data),
        preview=preview(msg.data, headers.get(h.CONTENT_TYPE, "")),
        body=decode_any(msg.data, headers.get(h.CONTENT_TYPE, "")) if full else None,
        gathers=tuple(i for i in headers.get(h.GATHERS, "").split(",") if i),
        dead_letter=f"{headers.get(h.DLQ_KIND, '')}: {headers.get(h.DLQ_REASON, '')}"
        if h.DLQ_REASON in headers
        else "",
    )


def _as_json(data: bytes, content_type: str) -> bytes | None:
    """The body re-encoded as compact JSON, or None if it is neither JSON nor msgpack."""
    try:
        obj = msgspec.msgpack.decode(data) if content_type.startswith(MSGPACK) else msgspec.json.decode(data)
        return msgspec.json.encode(obj)  # msgpack can hold what JSON cannot (e.g. binary keys)
    except (msgspec.DecodeError, UnicodeDecodeError, TypeError, msgspec.EncodeError, RecursionError):
        return None


def _undecodable(data: bytes, content_type: str) -> str:
    return f"<{len(data)} bytes, not {content_type or 'json'}: {data[:24]!r}>"


def decode_any(data: bytes, content_type: str) -> Any:
    """The body as plain data, or a description of bytes that are neither JSON nor msgpack."""
    encoded = _as_json(data, content_type)
    return msgspec.json.decode(encoded) if encoded is not None else _undecodable(data, content_type)


def preview(data: bytes, content_type: str) -> str:
    encoded = _as_json(data, content_type)
    text = encoded.decode() if encoded is not None else _undecodable(data, content_type)
    return text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…"


def format_line(line: TapLine, *, subject: bool = True) -> str:
    when = datetime.fromtimestamp(line.seen_ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
    latency = f"{line.latency_ms:7.2f}ms" if line.latency_ms is not None else "      - "
    head = (
        f"{when} {latency}  {line.sender} → {line.receiver}  {line.type}  "
        f"conv={line.conversation} hop={line.hop}" + (f" subj={line.subject}" if subject else "")
    )
    if line.dead_letter:
        return f"{head}  DEAD LETTER ({line.dead_letter})  {line.preview}"
    return f"{head}  {line.preview}"


def _int(raw: str | None) -> int:
    try:
        return int(raw) if raw else 0
    except ValueError:
        return 0


async def tap(
    transport: Transport,
    pattern: str,
    on_line: Callable[[TapLine], Awaitable[None] | None],
    *,
    full: bool = False,
) -> Subscription:
    """Subscribe to `pattern` and call `on_line` for each message seen."""
    subjects.check_pattern(pattern)

    async def seen(msg: Any) -> None:
        result = on_line(observe(msg, full=full))
        if result is not None:
            await result

    return await transport.subscribe(pattern, seen)
