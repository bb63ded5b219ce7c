"""Asking a JetStream KV bucket whether many keys exist, in one request.

The duplicate guard asks on every stored delivery whether its message was processed. One
KV get per delivery costs a request and a reply each; a busy agent takes its deliveries
in bursts, so the keys asked for in the same turn of the event loop go out together as
one batched direct get (``multi_last``, nats-server 2.11 and later), answered by the
records found and an end-of-batch status. A bucket that does not allow direct gets, or a
server that refuses the request, is asked one key at a time instead. A batch that no replica
answers (503: a cluster's replicas are electing a leader or lost their quorum) is asked key by
key that once; the next batch is tried again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

from nats.aio.client import Client as NatsClient

CHUNK: Final = 256  # keys in one request
_FOUND_NONE: Final = "404"
_END: Final = "204"
_NO_RESPONDERS: Final = "503"
_GONE: Final = frozenset({"DEL", "PURGE"})  # KV-Operation of a deleted key's marker


@dataclass(slots=True)
class _Batch:
    keys: list[str]
    waiting: dict[str, list[asyncio.Future[bool]]]
    found: set[str] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    refused: str = ""  # the status of a refusal


class BatchedExists:
    """`exists(key)` for a KV bucket; concurrent calls share one request."""

    def __init__(
        self,
        nc: NatsClient,
        bucket: str,
        one: Callable[[str], Awaitable[bool]],
        *,
        direct: bool,
        timeout: float = 5.0,
    ) -> None:
        self._nc = nc
        self._stream = f"KV_{bucket}"
        self._prefix = f"$KV.{bucket}."
        self._one = one  # the one-key lookup, where batches cannot be used
        self.direct = direct
        self._timeout = timeout
        self._waiting: dict[str, list[asyncio.Future[bool]]] = {}
        self._scheduled = False
        self._batches: dict[str, _Batch] = {}
        self._inbox = ""
        self._sub: Any = None
        self._counter = 0
        self.requests = 0  # batched requests sent, for tests and stats

    async def exists(self, key: str) -> bool:
        if not self.direct:
            return await self._one(key)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._waiting.setdefault(key, []).append(fut)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)  # after the other deliveries of this turn asked too
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, {}
        keys = list(waiting)
        for start in range(0, len(keys), CHUNK):
            chunk = keys[start : start + CHUNK]
            batch = _Batch(chunk, {k: waiting[k] for k in chunk})
            task = asyncio.ensure_future(self._ask(batch))
            task.add_done_callback(_retrieve)

    async def _ask(self, batch: _Batch) -> None:
        try:
            if self._sub is None:
                self._inbox = self._nc.new_inbox()
                self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply)
            self._counter += 1
            token = str(self._counter)
            self._batches[token] = batch
            request = json.dumps({"multi_last": [self._prefix + k for k in batch.keys]}).encode()
            self.requests += 1
            await self._nc.publish(
                f"$JS.API.DIRECT.GET.{self._stream}", request, reply=f"{self._inbox}.{token}"
            )
            try:
                await asyncio.wait_for(batch.done.wait(), self._timeout)
            finally:
                self._batches.pop(token, None)
            if batch.refused:
                if batch.refused != _NO_RESPONDERS:  # no direct gets here: one key at a time from now on
                    self.direct = False
                for key, futs in batch.waiting.items():
                    _settle(futs, await self._one(key))
                return
            for key, futs in batch.waiting.items():
                _settle(futs, key in batch.found)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else asyncio.CancelledError()
            for futs in batch.waiting.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(failure)
            if not isinstance(exc, Exception):
                raise

    async def _on_reply(self, msg: Any) -> None:
        batch = self._batches.get(msg.subject.rsplit(".", 1)[-1])
        if batch is None:
            return  # a batch that timed out
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            subject = headers.get("Nats-Subject", "")
            if subject.startswith(self._prefix) and headers.get("KV-Operation") not in _GONE:
                batch.found.add(subject[len(self._prefix) :])
            return
        if status not in (_END, _FOUND_NONE):  # not allowed, or no replica answers now
            batch.refused = str(status)
        batch.done.set()

    async def close(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()


def _settle(futs: list[asyncio.Future[bool]], value: bool) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(value)


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # already handed to the waiting callers
