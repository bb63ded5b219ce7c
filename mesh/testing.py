"""Test helpers: a real nats-server on a free port (or a cluster of them), agents in-process
or as processes, and a recorder that waits on messages instead of sleeping. Agents also run
on `MemoryBus`, the bus in memory, where a test needs no server.

    with nats_server(tmp_path) as server:
        settings = Settings.load(environ={}, nats_url=server.url, data_dir=tmp_path)
        async with running_agent(agent, settings) as runtime:
            ...
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from mesh.agent import launch
from mesh.agent.declaration import Agent
from mesh.agent.launch import stop_process as stop_process  # re-exported for tests
from mesh.agent.runner import AgentRuntime
from mesh.llm import LLM
from mesh.transport.cluster import EmbeddedCluster
from mesh.transport.memory import MemoryBus as MemoryBus  # re-exported: agents on a bus in memory
from mesh.transport.nats import NatsTransport, Subscription, Transport
from mesh.transport.server import EmbeddedServer
from mesh.wire.settings import Settings


@contextmanager
def nats_server(directory: Path) -> Iterator[EmbeddedServer]:
    """A real nats-server (JetStream on) on a free loopback port, stopped afterwards."""
    server = EmbeddedServer(Path(directory))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def nats_cluster(directory: Path, n: int = 3) -> Iterator[EmbeddedCluster]:
    """A real cluster of `n` nats-servers on loopback (routes between them, a store each,
    JetStream on), ready once they have elected a meta leader; stopped afterwards.
    ``cluster.url`` is the comma-separated client URL; ``cluster.node("n2").kill()`` and
    ``.start()`` take one down and bring it back on the same ports."""
    cluster = EmbeddedCluster(Path(directory), n)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@asynccontextmanager
async def running_agent(
    agent: Agent, settings: Settings, *, llm: LLM | None = None, transport: Transport | None = None
) -> AsyncIterator[AgentRuntime]:
    """Run `agent` in this process until the block ends, then drain it: on the NATS server
    of `settings`, or on `transport` (e.g. ``MemoryBus().transport()``, no server needed)."""
    transport = transport or await NatsTransport.connect(settings, agent.name)
    runtime = AgentRuntime(agent, settings, transport, llm=llm)
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop(timeout=5)
        await transport.close()


def spawn_agent(
    spec: str, settings: Settings, *, log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start `mesh run spec` as its own process, pointed at the same server, data dir and span
    file; other settings are the child's defaults unless `env` gives them (MESH_REPLICAS...)."""
    base = {"MESH_TRACE_FILE": str(settings.spans_path), **(env or {})}
    return launch.spawn_agent(
        spec, url=settings.nats_url or "", data_dir=settings.data_dir, log=log, env=base
    )


class Recorder:
    """Collects every raw message on a pattern; `wait_for` returns when enough arrived."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._changed = asyncio.Condition()
        self._sub: Subscription | None = None

    @classmethod
    async def start(cls, transport: Transport, pattern: str) -> Recorder:
        rec = cls()
        rec._sub = await transport.subscribe(pattern, rec._on)
        await transport.flush()
        return rec

    async def _on(self, msg: Any) -> None:
        async with self._changed:
            self.messages.append(msg)
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = 10.0) -> list[Any]:
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self.messages))
        return self.messages

    async def wait_count(self, n: int, timeout: float = 10.0) -> list[Any]:
        return await self.wait_for(lambda msgs: len(msgs) >= n, timeout)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
