"""The in-memory bus's streams and consumers: stored messages with JetStream's rules the
mesh relies on (dedupe by `Nats-Msg-Id` within a window, work-queue retention, limits,
redelivery after the ack wait up to MaxDeliver, the max-deliveries advisory)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from mesh.transport.delivery import Delivery
from mesh.transport.streams import ConsumerSpec, StreamSpec
from mesh.wire import subjects
from mesh.wire.errors import StreamFull

if TYPE_CHECKING:
    from mesh.transport.memory import MemoryBus

log = structlog.get_logger("mesh.transport.memory")

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


@dataclass(slots=True)
class Stored:
    """A message kept by a stream, as `Transport.stored` returns it."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    seq: int
    at: float


@dataclass(slots=True)
class Core:
    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str = ""


class Sub:
    """A subscription: messages are handed to its handler one at a time, in order."""

    def __init__(self, bus: MemoryBus, pattern: str, queue: str, handler: Callable[[Any], Awaitable[None]]):
        self.bus, self.pattern, self.queue, self.handler = bus, pattern, queue, handler
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run())

    def put(self, msg: Any) -> None:
        self._inbox.put_nowait(msg)

    async def _run(self) -> None:
        while True:
            msg = await self._inbox.get()
            try:
                await self.handler(msg)
            except Exception as exc:  # as nats-py: a failing callback does not end the subscription
                log.warning("subscription callback failed", subject=msg.subject, error=repr(exc))
            finally:
                self._inbox.task_done()

    async def drain(self) -> None:
        self.bus.unsubscribe(self)
        await self._inbox.join()
        self._task.cancel()

    async def unsubscribe(self, limit: int = 0) -> None:
        self.bus.unsubscribe(self)
        self._task.cancel()


@dataclass
class Stream:
    spec: StreamSpec
    messages: dict[int, Stored] = field(default_factory=dict)
    last: int = 0
    seen: dict[str, tuple[int, float]] = field(default_factory=dict)  # Nats-Msg-Id -> seq, when
    size: int = 0  # bytes held, counted as `_size` does
    per_subject: dict[str, int] = field(default_factory=dict)  # messages held per subject

    def add(self, msg: Stored) -> None:
        self.messages[msg.seq] = msg
        self.size += size_of(msg)
        self.per_subject[msg.subject] = self.per_subject.get(msg.subject, 0) + 1

    def remove(self, seq: int) -> None:
        msg = self.messages.pop(seq, None)
        if msg is None:
            return
        self.size -= size_of(msg)
        left = self.per_subject.get(msg.subject, 1) - 1
        if left:
            self.per_subject[msg.subject] = left
        else:
            self.per_subject.pop(msg.subject, None)

    def make_room(self, subject: str, size: int, now: float) -> None:
        """Apply the stream's limits before a message of `size` bytes on `subject` is
        stored: drop what is past its age; then refuse it (StreamFull) or drop the oldest,
        as the stream's discard policy says."""
        spec = self.spec
        if spec.max_age:
            for seq, msg in list(self.messages.items()):
                if msg.at >= now - spec.max_age:
                    break  # in order of arrival
                self.remove(seq)
        over_subject = bool(spec.max_msgs_per_subject) and (
            self.per_subject.get(subject, 0) >= spec.max_msgs_per_subject
        )
        over_bytes = bool(spec.max_bytes) and self.size + size > spec.max_bytes
        if spec.discard_new and (over_subject or over_bytes):
            what = "messages per subject" if over_subject else "bytes"
            raise StreamFull(f"{subject!r} was not stored: the stream is full (maximum {what} exceeded)")
        if over_subject:
            oldest = next(seq for seq, m in self.messages.items() if m.subject == subject)
            self.remove(oldest)
        while spec.max_bytes and self.messages and self.size + size > spec.max_bytes:
            self.remove(next(iter(self.messages)))


def size_of(msg: Stored | Core) -> int:
    headers = msg.headers or {}
    return len(msg.subject) + len(msg.data) + sum(len(k) + len(v) + 4 for k, v in headers.items())


@dataclass
class ConsumerState:
    """A durable consumer: what it has handed out, and when each may be handed out again."""

    stream: Stream
    spec: ConsumerSpec
    floor: int  # the last sequence considered for a first delivery
    deliveries: dict[int, int] = field(default_factory=dict)  # seq -> times handed out
    due: dict[int, float] = field(default_factory=dict)  # unacknowledged seq -> when it may go again
    redelivered: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, subject: str) -> bool:
        return any(subjects.matches(f, subject) for f in self.spec.filters) or not self.spec.filters

    def take(self, now: float) -> tuple[int, float] | None:
        """The next message to hand out (its seq), or when to look again."""
        soonest = float("inf")
        for seq, when in sorted(self.due.items()):
            if seq not in self.stream.messages:
                self.forget(seq)
                continue
            if when > now:
                soonest = min(soonest, when)
                continue
            return seq, 0.0
        for seq in range(self.floor + 1, self.stream.last + 1):
            self.floor = seq
            msg = self.stream.messages.get(seq)
            if msg is not None and self.matches(msg.subject):
                return seq, 0.0
        return None if soonest == float("inf") else (0, soonest)

    def forget(self, seq: int) -> None:
        self.due.pop(seq, None)
        self.deliveries.pop(seq, None)


class MemoryDelivery:
    """A stored delivery from a memory consumer."""

    __slots__ = ("_bus", "_state", "attempt", "data", "headers", "origin", "seq", "subject")

    stored = True
    reply = ""

    def __init__(self, bus: MemoryBus, state: ConsumerState, msg: Stored, attempt: int) -> None:
        self._bus, self._state = bus, state
        self.subject, self.data, self.headers, self.seq = msg.subject, msg.data, msg.headers, msg.seq
        self.attempt = attempt
        self.origin = f"{state.stream.spec.name}-{msg.seq}"

    async def ack(self) -> None:
        st = self._state
        st.forget(self.seq)
        if st.stream.spec.work_queue:
            st.stream.remove(self.seq)
        st.changed.set()

    async def nak(self, delay: float | None = None) -> None:
        st = self._state
        if self.seq in st.due:
            st.due[self.seq] = time.monotonic() + (delay or 0.0)
            st.changed.set()

    async def in_progress(self) -> None:
        st = self._state
        if self.seq in st.due:
            st.due[self.seq] = time.monotonic() + st.spec.ack_wait


class MemoryConsumer:
    """One replica's pull from a durable consumer, at most `capacity` messages in hand."""

    def __init__(
        self,
        bus: MemoryBus,
        state: ConsumerState,
        handler: Callable[[Delivery, Any], Awaitable[None]],
        capacity: int,
    ) -> None:
        self._bus, self._state, self._handler, self.capacity = bus, state, handler, capacity
        self.in_hand = 0
        self._stopping = False
        self._room = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    def done(self) -> None:
        self.in_hand -= 1
        self._room.set()

    async def _run(self) -> None:
        st = self._state
        while not self._stopping:
            if self.in_hand >= self.capacity:
                self._room.clear()
                await self._room.wait()
                continue
            now = time.monotonic()
            self._expire(now)
            got = st.take(now)
            if got is None or got[0] == 0:
                st.changed.clear()
                wait = None if got is None else max(0.0, got[1] - now)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(st.changed.wait(), wait)
                continue
            seq = got[0]
            count = st.deliveries.get(seq, 0) + 1
            st.deliveries[seq] = count
            if count > 1:
                st.redelivered += 1
            st.due[seq] = now + st.spec.ack_wait  # handed back unless acknowledged or kept alive
            self.in_hand += 1
            await self._handler(MemoryDelivery(self._bus, st, st.stream.messages[seq], count), self)

    def _expire(self, now: float) -> None:
        """Past MaxDeliver: stop handing it out and say so, as the server's advisory."""
        st = self._state
        for seq, count in list(st.deliveries.items()):
            if count >= st.spec.max_deliver and st.due.get(seq, 0) <= now:
                st.forget(seq)
                event = {"stream": st.stream.spec.name, "stream_seq": seq, "deliveries": count}
                subject = f"{ADVISORY}.{st.stream.spec.name}.{st.spec.name}"
                self._bus.route(Core(subject, json.dumps(event).encode(), None))

    async def stop(self) -> None:
        self._stopping = True
        self._state.changed.set()
        self._room.set()

    async def close(self) -> None:
        await self.stop()
        self._task.cancel()
