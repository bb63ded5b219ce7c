"""A continuous pull from a JetStream consumer, sized by free worker slots.

Each replica of an agent asks the server for at most as many messages as it has room
for, so a busy replica never hoards work that an idle one could do, and the rest waits
in the stream (visible as pending in `mesh agents`). nats-py's `fetch` waits for a full
batch before returning, which adds latency when traffic is sparse; this pulls
continuously instead: a new pull request goes out whenever enough slots are free.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from mesh.transport.delivery import Delivery

log = structlog.get_logger("mesh.transport.consumer")


class Stored:
    """A `Delivery` from a JetStream consumer."""

    __slots__ = ("_msg", "attempt", "data", "headers", "origin", "stored_ns", "subject")

    stored = True
    reply = ""  # the message's reply subject is JetStream's acknowledgement, not a requester

    def __init__(self, msg: Msg) -> None:
        meta = msg.metadata
        self._msg = msg
        self.subject: str = msg.subject
        self.data: bytes = msg.data
        self.headers: dict[str, str] | None = msg.headers
        self.attempt = int(meta.num_delivered or 1)
        self.origin = f"{meta.stream}-{meta.sequence.stream}"
        # when the stream stored it (a signed message's Mesh-Sent-At is checked against it)
        self.stored_ns = int(meta.timestamp.timestamp() * 1e9) if meta.timestamp else 0

    async def ack(self) -> None:
        await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        await self._msg.nak(delay=delay)

    async def in_progress(self) -> None:
        await self._msg.in_progress()


_STATUS = "Status"
_PENDING_MSGS = "Nats-Pending-Messages"


class PullConsumer:
    """Pull messages of ``stream``/``consumer`` into ``on_message(msg, self)`` while there is
    capacity.

    ``capacity`` bounds the messages handed out and not yet `done` (each must be followed
    by exactly one `done()` call). Pull requests expire after ``expires`` seconds and ask
    for idle heartbeats, so a lost request (server restart, reconnect) is noticed and
    reissued.
    """

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        consumer: str,
        on_message: Callable[[Delivery, PullConsumer], Awaitable[None]],
        *,
        capacity: int,
        expires: float = 30.0,
        heartbeat: float = 5.0,
    ) -> None:
        self._nc = nc
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._on_message = on_message
        self.capacity = capacity
        self._expires = expires
        self._heartbeat = heartbeat
        self._in_hand = 0
        self._outstanding = 0
        self._inbox = ""
        self._sub: Any = None
        self._watch: asyncio.Task[None] | None = None
        self._heard = 0.0
        self._stopping = False
        self._pulls: set[asyncio.Future[None]] = set()
        self.name = f"{stream}/{consumer}"

    @property
    def in_hand(self) -> int:
        return self._in_hand

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._receive)
        self._heard = asyncio.get_running_loop().time()
        await self._pull()
        self._watch = asyncio.create_task(self._watchdog())

    def done(self) -> None:
        """One handed-out message is finished (acked, naked or dead-lettered)."""
        self._in_hand -= 1
        if not self._stopping:
            free = self.capacity - self._in_hand - self._outstanding
            if free >= max(1, self.capacity // 4) or self._outstanding == 0:
                task = asyncio.ensure_future(self._pull())
                self._pulls.add(task)
                task.add_done_callback(self._pulls.discard)

    async def stop(self) -> None:
        """Ask for nothing more. Messages that still arrive are handed back (nak) at once."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def close(self) -> None:
        await self.stop()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _pull(self) -> None:
        want = self.capacity - self._in_hand - self._outstanding
        if want <= 0 or self._stopping or not self._nc.is_connected:
            return
        self._outstanding += want
        request = {
            "batch": want,
            "expires": int(self._expires * 1e9),
            "idle_heartbeat": int(self._heartbeat * 1e9),
        }
        try:
            await self._nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox)
        except Exception as exc:  # disconnected: the watchdog asks again
            self._outstanding -= want
            log.debug("pull request not sent", consumer=self.name, error=str(exc))

    async def _receive(self, msg: Msg) -> None:
        self._heard = asyncio.get_running_loop().time()
        headers = msg.headers or {}
        status = headers.get(_STATUS)
        if status is not None:
            if status == "100":  # idle heartbeat (or flow control)
                if msg.reply:
                    await self._nc.publish(msg.reply, b"")
                return
            if status == "503":
                # no one took the request: the consumer has no leader (an election, a lost
                # quorum). Nothing is outstanding; the watchdog asks again within a second.
                self._outstanding = 0
                return
            # 408 request expired, 409 max waiting/deleted/leadership change, 404 none
            unfilled = headers.get(_PENDING_MSGS)
            if unfilled is not None:
                self._outstanding = max(0, self._outstanding - int(unfilled))
            elif status in ("404", "408", "409"):
                self._outstanding = 0
            if status == "409":
                log.info("pull request ended by the server", consumer=self.name, reason=msg.data[:200])
            await self._pull()
            return
        self._outstanding = max(0, self._outstanding - 1)
        if self._stopping:
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        self._in_hand += 1
        await self._on_message(Stored(msg), self)

    async def _watchdog(self) -> None:
        """Reissue the pull after a reconnect, or when the server has gone quiet for two
        heartbeats: either way the server has forgotten the pull requests in flight."""
        loop = asyncio.get_running_loop()
        reconnects = self._nc.stats["reconnects"]
        while not self._stopping:
            await asyncio.sleep(min(1.0, self._heartbeat))
            now = self._nc.stats["reconnects"]
            if now != reconnects or loop.time() - self._heard > 2 * self._heartbeat:
                reconnects = now
                self._outstanding = 0
                self._heard = loop.time()
            await self._pull()
