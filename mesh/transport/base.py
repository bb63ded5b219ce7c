"""What the mesh needs from a message bus: the `Transport` Protocol and its handlers.

Everything above the transport layer talks to `Transport` (and to
`mesh.transport.state.StateStore` for shared state). Two implement it: `NatsTransport`
(mesh.transport.nats) and `MemoryTransport` (mesh.transport.memory, for tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from mesh.transport.delivery import Consumer, Delivery
from mesh.transport.outbox import Outbox
from mesh.transport.state import StateStore
from mesh.transport.streams import BucketSpec, ConsumerSpec, StreamSpec
from mesh.wire.settings import Settings


class RawMessage(Protocol):
    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str


RawHandler = Callable[[Any], Awaitable[None]]
DeliveryHandler = Callable[[Delivery], Awaitable[None]]
StoredHandler = Callable[[Delivery, Consumer], Awaitable[None]]


class Subscription(Protocol):
    async def drain(self) -> None: ...

    async def unsubscribe(self, limit: int = 0) -> None: ...


class Transport(Protocol):
    """What the mesh needs from a message bus."""

    @property
    def connected_url(self) -> str: ...

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, reply: str = ""
    ) -> None: ...

    async def subscribe(self, subject: str, handler: RawHandler, queue: str = "") -> Subscription: ...

    def new_inbox(self) -> str:
        """A fresh reply subject in this connection's own inbox space (an identity may
        subscribe only under its own prefix: mesh.transport.auth)."""
        ...

    async def listen(self, subject: str, handler: DeliveryHandler, queue: str = "") -> Subscription:
        """Subscribe for deliveries (core NATS: at most once), as the runtime takes them."""
        ...

    async def request(
        self, subject: str, data: bytes, timeout: float, headers: dict[str, str] | None = None
    ) -> Any:
        """Publish with a reply subject and wait for the first answer."""
        ...

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        """Publish and wait until a stream has stored the message; its stream sequence."""
        ...

    def outbox(self) -> Outbox:
        """Stores for one handler run: published at once, acknowledged together (`flush`)."""
        ...

    async def ensure_stream(self, spec: StreamSpec, settings: Settings) -> None:
        """Create the stream if absent (ServerError when the server has no JetStream,
        ServerUnavailable when a cluster has no meta leader)."""
        ...

    async def ensure_streams(self) -> None: ...

    async def ensure_consumer(self, spec: ConsumerSpec) -> None: ...

    async def consume(self, spec: ConsumerSpec, handler: StoredHandler, capacity: int) -> Consumer: ...

    async def consumer_info(self, stream: str, name: str) -> Any: ...

    async def consumers(self, stream: str) -> dict[str, list[str]]:
        """The consumers of a stream by name, with their filter subjects."""
        ...

    async def stored(self, stream: str, seq: int) -> Any:
        """A stored message by stream sequence (subject, data, headers, seq)."""
        ...

    async def stored_next(self, stream: str, seq: int, subject: str) -> Any | None:
        """The first stored message at or after `seq` on `subject` (a pattern), or None."""
        ...

    async def stored_many(self, stream: str, seq: int, subject: str, batch: int = 256) -> list[Any]:
        """Up to `batch` stored messages at or after `seq` on `subject` (a pattern), in order;
        an empty list when there are no more."""
        ...

    async def stream_bounds(self, stream: str) -> tuple[int, int]:
        """The first and last sequence a stream holds."""
        ...

    async def stored_last(self, stream: str, subject: str) -> Any | None:
        """The last stored message on `subject`, or None."""
        ...

    async def delete_stored(self, stream: str, seq: int) -> None: ...

    async def state(self, bucket: BucketSpec, settings: Settings) -> StateStore:
        """A key-value bucket (created if absent)."""
        ...

    async def flush(self, timeout: float = 5.0) -> None: ...

    @property
    def is_connected(self) -> bool: ...

    @property
    def max_payload(self) -> int:
        """The largest message (headers and body) the bus takes."""
        ...

    closed: asyncio.Event  # set when the connection has closed for good

    async def close(self) -> None: ...
