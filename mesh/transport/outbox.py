"""The stored sends of one handler run, published without waiting for each acknowledgement.

A handler that sends three messages used to wait for three stream acknowledgements, one
after another, each with a timer of its own. Through an `Outbox` each send is published at
once and the runtime waits for all the acknowledgements together, once, when the handler
has finished and before it acknowledges the message it handled (`flush`). A send that was
refused, or whose acknowledgement did not come, is stored again the waiting way
(`Transport.store`: retries while a cluster has no leader) with the same headers, so the
same ``Nats-Msg-Id``: the stream keeps one copy. If that fails too, `flush` raises, the
handler counts as failed, and the message it handled goes back to the stream unacknowledged,
to be handled again, when its sends get the same derived ids and are dropped as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

if TYPE_CHECKING:
    from mesh.transport.base import Transport
    from mesh.transport.nats import NatsTransport

ACK_TIMEOUT: Final = 5.0  # seconds `flush` waits for the acknowledgements before storing again


class Outbox(Protocol):
    """Stores into streams; `flush` returns once everything stored so far is acknowledged."""

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        """Publish to a stream (its acknowledgement may come later)."""
        ...

    async def flush(self) -> None:
        """Wait until every message given to `store` is stored; raise if one cannot be."""
        ...

    def close(self) -> None:
        """Stop waiting for what was not flushed (the handler failed); later stores wait
        for their own acknowledgement."""
        ...


class Waiting:
    """An outbox that stores each message before `store` returns (any `Transport`)."""

    __slots__ = ("_transport",)

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        await self._transport.store(subject, data, headers)

    async def flush(self) -> None:
        return None

    def close(self) -> None:
        return None


class _Refused(Exception):
    """A stream refused a message, or nobody stored it (only looked at, never raised)."""


class _Error(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Ack(msgspec.Struct):
    seq: int = 0
    error: _Error | None = None


_decode_ack = msgspec.json.Decoder(_Ack).decode


class Acks:
    """The acknowledgements of one connection's stores that nobody waits for yet: each
    goes to its own reply subject under one subscription (``_INBOX.<id>.<n>``), and settles
    a future. (nats-py's ``publish_async`` leaves the future of a refused message pending:
    its error turns into an exception inside the subscription's callback.)"""

    def __init__(self, nc: Any) -> None:
        self._nc = nc
        self._prefix = ""
        self._sub: Any = None
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._counter = 0

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> tuple[str, asyncio.Future[None]]:
        """Publish with a reply subject of its own; the token and the future of its ack."""
        if self._sub is None:
            self._prefix = self._nc.new_inbox() + "."
            self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_ack)
        self._counter += 1
        token = str(self._counter)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = ack
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            del self._waiting[token]
            raise
        return token, ack

    def forget(self, token: str) -> None:
        """No longer wait for this acknowledgement."""
        self._waiting.pop(token, None)

    async def _on_ack(self, msg: Any) -> None:
        ack = self._waiting.pop(msg.subject[len(self._prefix) :], None)
        if ack is None or ack.done():
            return  # given up on already
        status = (msg.headers or {}).get("Status")
        if status is not None:  # 503: no stream (leader) took the message
            ack.set_exception(_Refused(f"status {status}"))
            return
        try:
            got = _decode_ack(msg.data)
        except msgspec.DecodeError:
            ack.set_exception(_Refused(f"an acknowledgement that does not parse: {msg.data[:200]!r}"))
            return
        if got.error is not None:
            ack.set_exception(_Refused(f"{got.error.err_code}: {got.error.description}"))
        else:
            ack.set_result(None)  # stored, or a duplicate of one stored before

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class _Sent:
    __slots__ = ("ack", "data", "headers", "subject", "token")

    def __init__(
        self,
        token: str,
        ack: asyncio.Future[None],
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> None:
        self.token = token
        self.ack = ack
        self.subject = subject
        self.data = data
        self.headers = headers


class Pipelined:
    """A JetStream outbox: each store is published with a reply subject of its own (`Acks`),
    and `flush` waits for the acknowledgements that have not come yet, under one timer."""

    __slots__ = ("_acks", "_closed", "_sent", "_transport")

    def __init__(self, transport: NatsTransport, acks: Acks) -> None:
        self._transport = transport
        self._acks = acks
        self._sent: list[_Sent] = []
        self._closed = False

    @property
    def pending(self) -> int:
        """Messages published and not yet flushed."""
        return len(self._sent)

    async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
        transport = self._transport
        if self._closed or not transport.streams_ready:
            # after the run (a task the handler left behind), or the first store of a process
            # on a server that may not have the streams yet: the waiting way
            await transport.store(subject, data, headers)
            return
        transport.check_outgoing(subject, "", data, headers)
        try:
            token, ack = await self._acks.publish(subject, data, headers)
        except Exception:  # not even sent (the connection is closing): the waiting way
            await transport.store(subject, data, headers)
            return
        self._sent.append(_Sent(token, ack, subject, data, headers))

    async def flush(self) -> None:
        sent, self._sent = self._sent, []
        if not sent:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ACK_TIMEOUT):
                for s in sent:
                    with contextlib.suppress(Exception):
                        await s.ack  # at once if it came already; a failure is looked at below
        again: list[_Sent] = []
        for s in sent:
            ack = s.ack
            if not ack.done() or ack.cancelled() or ack.exception() is not None:
                self._acks.forget(s.token)
                ack.cancel()
                again.append(s)
        for s in again:  # same headers, same Nats-Msg-Id: one copy, whichever attempt landed
            await self._transport.store(s.subject, s.data, s.headers)

    def close(self) -> None:
        self._closed = True
        sent, self._sent = self._sent, []
        for s in sent:
            self._acks.forget(s.token)
            if s.ack.done():
                if not s.ack.cancelled():
                    s.ack.exception()  # looked at: asyncio does not log it as never retrieved
            else:
                s.ack.cancel()
