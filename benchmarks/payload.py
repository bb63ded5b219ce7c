"""The payload every workload carries: ``{id, conversation_id, text (256 chars), created_ns}``,
as a mesh message and as a plain msgspec struct for the raw floor. Both are JSON on the wire
and fully decoded and re-encoded at every hop."""

from __future__ import annotations

import time

import msgspec

from mesh import Message, message

TEXT = ("mesh benchmark payload " * 12)[:256]


@message("bench.event", version=1)
class Event(Message):
    id: int
    conversation_id: str
    text: str
    created_ns: int


class RawEvent(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    conversation_id: str
    text: str
    created_ns: int


def event(n: int, conversation: str) -> Event:
    return Event(id=n, conversation_id=conversation, text=TEXT, created_ns=time.time_ns())


def raw_event(n: int, conversation: str) -> RawEvent:
    return RawEvent(id=n, conversation_id=conversation, text=TEXT, created_ns=time.time_ns())
