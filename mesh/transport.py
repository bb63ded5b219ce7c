"""The bus behind a Protocol, and its NATS implementation.

Everything above this module talks to `Transport`; only this module imports nats-py's
client. A delivery is anything with ``subject``, ``data``, ``headers`` and ``reply``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import nats
import structlog
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import BadRequestError

from mesh.errors import ServerError
from mesh.server import resolve_url
from mesh.settings import Settings

log = structlog.get_logger("mesh.transport")


class RawMessage(Protocol):
    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str


RawHandler = Callable[[Any], Awaitable[None]]


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

    async def request(self, subject: str, data: bytes, timeout: float) -> Any:
        """Publish with a reply subject and wait for the first answer."""
        ...

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish and wait until a stream has stored the message."""
        ...

    async def ensure_stream(self, name: str, subjects: list[str], max_age_s: float) -> bool:
        """Create the stream if absent; False when the server has no JetStream."""
        ...

    async def flush(self, timeout: float = 5.0) -> None: ...

    @property
    def is_connected(self) -> bool: ...

    async def close(self) -> None: ...


class NatsTransport:
    """`Transport` over nats-py."""

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._js = nc.jetstream()

    @classmethod
    async def connect(cls, settings: Settings, name: str, *, url: str | None = None) -> NatsTransport:
        servers = [s.strip() for s in (url or resolve_url(settings)).split(",") if s.strip()]

        async def on_error(exc: Exception) -> None:
            log.warning("nats error", error=str(exc))

        async def on_disconnect() -> None:
            if not (nc.is_closed or nc.is_draining):
                log.warning("nats disconnected")

        async def on_reconnect() -> None:
            log.info("nats reconnected", url=str(nc.connected_url.netloc if nc.connected_url else ""))

        options: dict[str, Any] = {
            "servers": servers,
            "name": name,
            "connect_timeout": settings.connect_timeout,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "error_cb": on_error,
            "disconnected_cb": on_disconnect,
            "reconnected_cb": on_reconnect,
        }
        if settings.nats_creds:
            options["user_credentials"] = str(settings.nats_creds)
        try:
            nc = await asyncio.wait_for(nats.connect(**options), settings.connect_timeout * 2)
        except TimeoutError:
            raise ServerError(
                f"no answer from NATS at {', '.join(servers)} within {settings.connect_timeout * 2:.0f}s. "
                f"Is the server up? Start one with `mesh up`, or fix MESH_NATS_URL"
            ) from None
        except (OSError, ValueError, nats.errors.Error) as exc:
            raise ServerError(
                f"cannot connect to NATS at {', '.join(servers)}: {str(exc) or type(exc).__name__}. "
                f"Check MESH_NATS_URL (nats://host:port[,nats://host:port]) and MESH_NATS_CREDS"
            ) from None
        return cls(nc)

    @property
    def connected_url(self) -> str:
        u = self.nc.connected_url
        return f"nats://{u.netloc}" if u else ""

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, reply: str = ""
    ) -> None:
        await self.nc.publish(subject, data, reply=reply, headers=headers)

    async def subscribe(self, subject: str, handler: RawHandler, queue: str = "") -> Subscription:
        sub = await self.nc.subscribe(subject, queue=queue, cb=handler)
        return sub

    async def request(self, subject: str, data: bytes, timeout: float) -> Any:
        return await self.nc.request(subject, data, timeout=timeout)

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        await self._js.publish(subject, data, headers=headers)

    async def ensure_stream(self, name: str, subjects: list[str], max_age_s: float) -> bool:
        config = StreamConfig(name=name, subjects=subjects, storage=StorageType.FILE, max_age=max_age_s)
        try:
            await self._js.add_stream(config)
        except BadRequestError as exc:
            # 10058: the stream exists with another config; 10065: another stream already
            # captures these subjects. Either way, publishes to them are stored.
            if exc.err_code in (10058, 10065):
                return True
            raise
        except nats.errors.NoRespondersError:
            return False
        except nats.js.errors.ServiceUnavailableError:
            return False
        return True

    async def flush(self, timeout: float = 5.0) -> None:
        await self.nc.flush(timeout)  # type: ignore[arg-type]

    @property
    def is_connected(self) -> bool:
        return bool(self.nc.is_connected)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()
