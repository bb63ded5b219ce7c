"""Micro-batching of embeddings: texts asked for while the event loop is busy are embedded
together in one call of the embedder (what a real model needs to be fast), in a worker
thread so the service keeps answering."""

from __future__ import annotations

import asyncio

from mesh.memory.embedding import Embedder


class Batcher:
    def __init__(self, embedder: Embedder, max_batch: int = 64) -> None:
        self.embedder = embedder
        self.max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[list[float]]]] = []
        self._scheduled = False
        self.batches = 0  # calls of the embedder so far (for tests and stats)
        self._tasks: set[asyncio.Task[None]] = set()

    async def embed(self, text: str) -> list[float]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[float]] = loop.create_future()
        self._pending.append((text, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)  # after the requests already queued on the loop
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending:
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future[list[float]]]]) -> None:
        self.batches += 1
        try:
            vectors = await asyncio.to_thread(self.embedder.embed, [text for text, _ in batch])
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), vector in zip(batch, vectors, strict=True):
            if not future.done():
                future.set_result(vector)
