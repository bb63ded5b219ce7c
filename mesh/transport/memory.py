"""The mesh's bus in this process's memory, behind the same `Transport` interface as NATS.

`MemoryBus` plays the server: core publish and subscribe (wildcards, queue groups,
requests), the mesh's streams (work queues, retention, `Nats-Msg-Id` dedupe), durable pull
consumers shared by replicas (acknowledgements, `nak` with a delay, redelivery after the
ack wait, MaxDeliver and its advisory) and KV buckets. Each `bus.transport()` is one
connection to it. Agents run on it unchanged, so their tests need no server:

    bus = MemoryBus()
    async with running_agent(agent, settings, transport=bus.transport()) as runtime:
        ...

It keeps the rules the mesh relies on; it is not a NATS server: one process, nothing kept
on disk, no cluster. A stream's limits (bytes, messages per subject, age) hold as on the
server, with the sizes counted roughly (subject, headers and body), and ages checked when
a message is stored. Test what depends on the server
itself (crashes, restarts, clusters) against a real one (`mesh.testing.nats_server`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import structlog

from mesh.transport.delivery import Delivery, Direct
from mesh.transport.memstreams import (
    ConsumerState,
    Core,
    MemoryConsumer,
    Stored,
    Stream,
    Sub,
    size_of,
)
from mesh.transport.outbox import Outbox, Waiting
from mesh.transport.state import MemoryState, StateStore
from mesh.transport.streams import BucketSpec, ConsumerSpec, StreamSpec, stream_specs
from mesh.wire import subjects
from mesh.wire.envelope import NATS_MSG_ID
from mesh.wire.errors import ServerError, StreamFull
from mesh.wire.settings import Settings

log = structlog.get_logger("mesh.transport.memory")

MAX_PAYLOAD = 8 * 1024 * 1024


class NoRespondersError(ServerError):
    """A request found nobody subscribed to its subject (as NATS says "no responders")."""


class MemoryBus:
    """The server side, shared by every `transport()` made from it."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.load(environ={})
        self._subs: list[Sub] = []
        self._turns: dict[tuple[str, str], int] = {}
        self.streams: dict[str, Stream] = {}
        self.consumers: dict[tuple[str, str], ConsumerState] = {}
        self.buckets: dict[str, MemoryState] = {}
        self._inboxes = itertools.count(1)

    def transport(self) -> MemoryTransport:
        return MemoryTransport(self)

    def subscribe(self, pattern: str, queue: str, handler: Callable[[Any], Awaitable[None]]) -> Sub:
        sub = Sub(self, pattern, queue, handler)
        self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Sub) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def interested(self, subject: str) -> list[Sub]:
        """Who gets a core message: every plain subscriber, one member of each queue group."""
        plain = [s for s in self._subs if not s.queue and subjects.matches(s.pattern, subject)]
        groups: dict[str, list[Sub]] = {}
        for s in self._subs:
            if s.queue and subjects.matches(s.pattern, subject):
                groups.setdefault(s.queue, []).append(s)
        for name, members in groups.items():
            turn = self._turns.get((name, subject), 0)
            self._turns[(name, subject)] = turn + 1
            plain.append(members[turn % len(members)])
        return plain

    def route(self, msg: Core, *, stored: bool = False) -> int:
        """Hand `msg` to its subscribers and store it if a stream takes its subject: its
        sequence, or 0. A full stream raises StreamFull when `stored` (a publish that waits
        for the stream's answer), else the message is just not kept, as on the server."""
        for sub in self.interested(msg.subject):
            sub.put(msg)
        stream = self.stream_for(msg.subject)
        if stream is None:
            return 0
        try:
            return self.keep(stream, msg)
        except StreamFull:
            if stored:
                raise
            return 0

    def stream_for(self, subject: str) -> Stream | None:
        return next(
            (
                st
                for st in self.streams.values()
                if any(subjects.matches(p, subject) for p in st.spec.subjects)
            ),
            None,
        )

    def keep(self, stream: Stream, msg: Core) -> int:
        now = time.monotonic()
        msg_id = (msg.headers or {}).get(NATS_MSG_ID)
        if msg_id:
            seen = stream.seen.get(msg_id)
            if seen is not None and now - seen[1] < stream.spec.dedupe_window:
                return seen[0]
        at = time.time()
        stream.make_room(msg.subject, size_of(msg), at)
        stream.last += 1
        stream.add(Stored(msg.subject, msg.data, msg.headers, stream.last, at))
        if msg_id:
            stream.seen[msg_id] = (stream.last, now)
        for state in self.consumers.values():
            if state.stream is stream:
                state.changed.set()
        return stream.last

    def new_inbox(self) -> str:
        return f"_INBOX.memory.{next(self._inboxes)}"


class MemoryTransport:
    """One connection to a `MemoryBus`: the `Transport` the runtime and clients use."""

    def __init__(self, bus: MemoryBus) -> None:
        self.bus = bus
        self.settings = bus.settings
        self.closed = asyncio.Event()
        self._subs: list[Sub] = []
        self._consumers: list[MemoryConsumer] = []

    @property
    def connected_url(self) -> str:
        return "memory://"

    @property
    def is_connected(self) -> bool:
        return not self.closed.is_set()

    @property
    def max_payload(self) -> int:
        return MAX_PAYLOAD

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, reply: str = ""
    ) -> None:
        self.bus.route(Core(subject, data, dict(headers) if headers else None, reply))

    def new_inbox(self) -> str:
        return self.bus.new_inbox()

    async def subscribe(
        self, subject: str, handler: Callable[[Any], Awaitable[None]], queue: str = ""
    ) -> Sub:
        sub = self.bus.subscribe(subject, queue, handler)
        self._subs.append(sub)
        return sub

    async def listen(
        self, subject: str, handler: Callable[[Delivery], Awaitable[None]], queue: str = ""
    ) -> Sub:
        async def deliver(msg: Any) -> None:
            await handler(Direct(msg.subject, msg.data, msg.headers, msg.reply))

        return await self.subscribe(subject, deliver, queue)

    async def request(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Any:
        if not self.bus.interested(subject) and self.bus.stream_for(subject) is None:
            raise NoRespondersError(f"nobody listens on {subject!r}")
        inbox = self.bus.new_inbox()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        async def first(msg: Any) -> None:
            if not answer.done():
                answer.set_result(msg)

        sub = self.bus.subscribe(inbox, "", first)
        try:
            stream = self.bus.stream_for(subject)
            seq = self.bus.route(Core(subject, data, dict(headers) if headers else None, inbox))
            if stream is not None:  # a stored subject answers with the stream's acknowledgement
                ack = json.dumps(
                    {"stream": stream.spec.name, "seq": seq}
                    if seq
                    else {"error": {"code": 503, "err_code": 10077, "description": "the stream is full"}}
                ).encode()
                return Core(inbox, ack, None)
            return await asyncio.wait_for(answer, timeout)
        finally:
            await sub.unsubscribe()

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        if len(data) > MAX_PAYLOAD:
            raise ServerError(f"message to {subject!r} is larger than max_payload ({MAX_PAYLOAD})")
        if not self.bus.streams:
            await self.ensure_streams()
        if self.bus.stream_for(subject) is None:
            raise ServerError(f"no stream stored {subject!r}")
        return self.bus.route(Core(subject, data, dict(headers) if headers else None), stored=True)

    def outbox(self) -> Outbox:
        return Waiting(self)  # a store here is done when it returns: nothing to wait for later

    async def ensure_streams(self) -> None:
        for spec in stream_specs(self.settings):
            await self.ensure_stream(spec, self.settings)

    async def ensure_stream(self, spec: StreamSpec, settings: Settings) -> None:
        self.bus.streams.setdefault(spec.name, Stream(spec))

    async def ensure_consumer(self, spec: ConsumerSpec) -> None:
        stream = self.bus.streams.get(spec.stream)
        if stream is None:
            raise ServerError(f"no stream {spec.stream}")
        key = (spec.stream, spec.name)
        if key in self.bus.consumers:
            self.bus.consumers[key].spec = spec
            return
        floor = stream.last if spec.deliver_new else 0
        self.bus.consumers[key] = ConsumerState(stream, spec, floor)

    async def consume(
        self, spec: ConsumerSpec, handler: Callable[[Delivery, Any], Awaitable[None]], capacity: int
    ) -> MemoryConsumer:
        await self.ensure_consumer(spec)
        consumer = MemoryConsumer(self.bus, self.bus.consumers[(spec.stream, spec.name)], handler, capacity)
        self._consumers.append(consumer)
        return consumer

    async def consumer_info(self, stream: str, name: str) -> Any:
        st = self.bus.consumers.get((stream, name))
        if st is None:
            raise ServerError(f"no consumer {name} on {stream}")
        waiting = [
            s for s in range(st.floor + 1, st.stream.last + 1)
            if s in st.stream.messages and st.matches(st.stream.messages[s].subject)
        ]  # fmt: skip
        return SimpleNamespace(
            num_pending=len(waiting), num_ack_pending=len(st.due), num_redelivered=st.redelivered
        )

    async def consumers(self, stream: str) -> dict[str, list[str]]:
        return {name: list(st.spec.filters) for (s, name), st in self.bus.consumers.items() if s == stream}

    def _stream(self, name: str) -> Stream:
        stream = self.bus.streams.get(name)
        if stream is None:
            raise ServerError(f"no stream {name}")
        return stream

    async def stored(self, stream: str, seq: int) -> Any:
        msg = self._stream(stream).messages.get(seq)
        if msg is None:
            raise ServerError(f"no message {seq} in {stream}")
        return msg

    async def stored_next(self, stream: str, seq: int, subject: str) -> Any | None:
        st = self._stream(stream)
        return next(
            (m for s, m in sorted(st.messages.items()) if s >= seq and subjects.matches(subject, m.subject)),
            None,
        )

    async def stored_many(self, stream: str, seq: int, subject: str, batch: int = 256) -> list[Any]:
        st = self._stream(stream)
        found = (
            m for s, m in sorted(st.messages.items()) if s >= seq and subjects.matches(subject, m.subject)
        )
        return [m for _, m in zip(range(batch), found, strict=False)]

    async def stream_bounds(self, stream: str) -> tuple[int, int]:
        seqs = sorted(self._stream(stream).messages)
        return (seqs[0], seqs[-1]) if seqs else (0, 0)

    async def stored_last(self, stream: str, subject: str) -> Any | None:
        st = self.bus.streams.get(stream)
        if st is None:  # as on NATS: no stream, no message
            return None
        return next((m for _, m in sorted(st.messages.items(), reverse=True) if m.subject == subject), None)

    async def delete_stored(self, stream: str, seq: int) -> None:
        self._stream(stream).remove(seq)

    async def state(self, bucket: BucketSpec, settings: Settings) -> StateStore:
        return self.bus.buckets.setdefault(bucket.name, MemoryState())

    async def flush(self, timeout: float = 5.0) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        for consumer in self._consumers:
            await consumer.close()
        for sub in self._subs:
            await sub.unsubscribe()
        self.closed.set()
