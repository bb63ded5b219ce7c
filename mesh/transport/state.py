"""Shared state: a key-value bucket with compare-and-set behind a Protocol, and its
JetStream KV implementation. Joins, approvals, failure histories and the
processed-message records live here."""

from __future__ import annotations

from typing import Protocol

import nats
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from mesh.transport.kvbatch import BatchedExists
from mesh.wire import subjects


class StateStore(Protocol):
    """A key-value bucket with compare-and-set: the only place shared state lives."""

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """The value and its revision, or None."""
        ...

    async def create(self, key: str, value: bytes) -> int | None:
        """Store if absent: the new revision, or None if the key exists."""
        ...

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        """Compare-and-set: the new revision, or None if `revision` is no longer current."""
        ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def put_nowait(self, key: str, value: bytes) -> None:
        """Write without waiting for the store to confirm (for hints that may be lost)."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether `key` holds a value. Calls made at the same time may share one request."""
        ...

    async def delete(self, key: str) -> None: ...

    async def keys(self, pattern: str) -> list[str]:
        """The keys present that match `pattern` (``*`` and ``>`` wildcards)."""
        ...


class NatsState:
    """`StateStore` over a JetStream KV bucket."""

    def __init__(self, nc: NatsClient, kv: KeyValue, bucket: str) -> None:
        self._nc = nc
        self._kv = kv
        self._prefix = f"$KV.{bucket}."
        self._exists = BatchedExists(nc, bucket, self._has, direct=bool(getattr(kv, "_direct", False)))

    async def exists(self, key: str) -> bool:
        return await self._exists.exists(key)

    async def _has(self, key: str) -> bool:
        return await self.get(key) is not None

    async def get(self, key: str) -> tuple[bytes, int] | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return (entry.value or b""), int(entry.revision or 0)

    async def create(self, key: str, value: bytes) -> int | None:
        try:
            return int(await self._kv.create(key, value))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        try:
            return int(await self._kv.update(key, value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def put(self, key: str, value: bytes) -> int:
        return int(await self._kv.put(key, value))

    async def put_nowait(self, key: str, value: bytes) -> None:
        await self._nc.publish(self._prefix + key, value)

    async def delete(self, key: str) -> None:
        await self._kv.delete(key)

    async def keys(self, pattern: str, *, timeout: float = 5.0) -> list[str]:
        """The keys now present that match `pattern` (``*`` and ``>`` wildcards), for an
        operator looking something up (it reads the bucket: agents may not)."""
        watcher = await self._kv.watch(pattern, ignore_deletes=True, meta_only=True)
        found: list[str] = []
        try:
            while (entry := await watcher.updates(timeout)) is not None:  # type: ignore[no-untyped-call]
                found.append(entry.key)
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return found


class MemoryState:
    """`StateStore` in this process's memory, with the same compare-and-set rules as a
    bucket: for tests of code that keeps state, and for running without a server."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[bytes, int]] = {}
        self._revision = 0

    def _next(self, key: str, value: bytes) -> int:
        self._revision += 1
        self._values[key] = (value, self._revision)
        return self._revision

    async def get(self, key: str) -> tuple[bytes, int] | None:
        return self._values.get(key)

    async def create(self, key: str, value: bytes) -> int | None:
        return None if key in self._values else self._next(key, value)

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        got = self._values.get(key)
        return self._next(key, value) if got is not None and got[1] == revision else None

    async def put(self, key: str, value: bytes) -> int:
        return self._next(key, value)

    async def put_nowait(self, key: str, value: bytes) -> None:
        self._next(key, value)

    async def exists(self, key: str) -> bool:
        return key in self._values

    async def delete(self, key: str) -> None:
        self._values.pop(key, None)

    async def keys(self, pattern: str) -> list[str]:
        return sorted(k for k in self._values if subjects.matches(pattern, k))
