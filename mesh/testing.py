"""Test helpers: a real nats-server on a free port (or a cluster of them), agents in-process
or as processes, and a recorder that waits on messages instead of sleeping. Agents also run
on `MemoryBus`, the bus in memory, where a test needs no server.

    with nats_server(tmp_path) as server:
        settings = Settings.load(environ={}, nats_url=server.url, data_dir=tmp_path)
        async with running_agent(agent, settings) as runtime:
            ...

A recorded conversation (`mesh record --export`) is a regression test for new versions of
its agents: `replay_file` runs it through them on an isolated mesh and reports what they
now send differently (mesh.agent.replay):

    async def test_writer_v2_still_answers_like_v1() -> None:
        report = await replay_file("tests/recordings/c-42.json", {"writer": writer_v2})
        report.assert_same()

`secure_nats_server` starts one that requires authentication, as `mesh up` does, to test an
agent on its own identity and permissions. Given settings made `SecureServer.local`, a test
runs as on the machine that ran `mesh up`: `running_agent` and `spawn_agent` run each agent
on its own identity, issued from its declaration as `mesh run` is, and `mesh` commands on
their roles.
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
from mesh.agent.diff import Report
from mesh.agent.identity import grant_of, provision
from mesh.agent.launch import stop_process as stop_process  # re-exported for tests
from mesh.agent.replay import Recording, replay
from mesh.agent.runner import AgentRuntime
from mesh.llm import LLM
from mesh.transport.auth import Keyring, Role
from mesh.transport.base import Subscription, Transport
from mesh.transport.cluster import EmbeddedCluster
from mesh.transport.identities import embedded_server, reload
from mesh.transport.memory import MemoryBus as MemoryBus  # re-exported: agents on a bus in memory
from mesh.transport.nats import NatsTransport
from mesh.transport.server import EmbeddedServer, write_state
from mesh.transport.streams import agent_consumer_specs, bucket_specs
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


class SecureServer:
    """A nats-server that requires authentication, as `mesh up` starts it, with its keyring:
    `agent` issues an agent's identity from its declaration, `role` a role's; both give the
    settings to connect with. See `secure_nats_server`."""

    def __init__(self, server: EmbeddedServer, settings: Settings) -> None:
        assert server.auth is not None and server.info is not None
        self.server = server
        self.keyring = Keyring(server.auth)
        self.settings = settings.model_copy(update={"nats_url": server.url})  # no credentials
        self._prepared = False

    @property
    def url(self) -> str:
        return self.server.url

    def local(self, settings: Settings) -> Settings:
        """`settings` (without credentials) for a process on the machine that runs this
        server, as `mesh up` leaves it: the server is recorded under ``settings.data_dir``, so
        an agent started with them (`running_agent`, `spawn_agent`, `mesh run`) is issued its
        own identity from its declaration, and a `mesh` command its role, from this keyring."""
        assert self.server.info is not None
        write_state(settings, self.server.info)
        return settings.model_copy(update={"nats_url": self.url, "nats_creds": None})

    async def prepare(self) -> None:
        """Create the streams and buckets as the operator, as `mesh up` does (an agent may
        only check that they exist)."""
        operator = self.role("operator")
        transport = await NatsTransport.connect(operator, "mesh-testing")
        try:
            await self._prepare(transport, operator)
        finally:
            await transport.close()

    async def _prepare(self, transport: NatsTransport, operator: Settings) -> None:
        if not self._prepared:
            await transport.ensure_streams()
            for bucket in bucket_specs(operator):
                await transport.state(bucket, operator)
            self._prepared = True

    def role(self, role: Role) -> Settings:
        """Settings that connect as `role` (operator, publisher, observer)."""
        return self.settings.model_copy(update={"nats_creds": self.keyring.creds_path(f"role:{role}")})

    def identity(self, identity: str) -> Settings:
        """Settings that connect as an identity already issued (``agent:NAME``, ``role:ROLE``)."""
        return self.settings.model_copy(update={"nats_creds": self.keyring.creds_path(identity)})

    async def agent(self, agent: Agent) -> Settings:
        """Issue `agent`'s identity from its declaration (the server reloads), create the
        streams, buckets and its consumers as the operator, as a deployment does; the
        settings it connects with."""
        with self.keyring.locked():
            changed = self.keyring.issue_agent(grant_of(agent), self.settings)
        if changed:
            reload(self.server.info)  # type: ignore[arg-type]
        operator = self.role("operator")
        transport = await NatsTransport.connect(operator, "mesh-testing")
        try:
            await self._prepare(transport, operator)
            for spec in agent_consumer_specs(agent, operator):
                await transport.ensure_consumer(spec)
        finally:
            await transport.close()
        return self.identity(f"agent:{agent.name}")


@contextmanager
def secure_nats_server(directory: Path, settings: Settings | None = None) -> Iterator[SecureServer]:
    """A real nats-server on a free loopback port that admits only the identities of its
    keyring (under ``directory``), with the roles issued; stopped afterwards.

        with secure_nats_server(tmp_path) as mesh:
            async with running_agent(agent, await mesh.agent(agent)):
                client = await MeshClient.connect(mesh.role("publisher"), "test")
    """
    base = settings or Settings.load(environ={}, trace_exporter="none", connect_timeout=2.0)
    base = base.model_copy(update={"data_dir": Path(directory)})
    server = embedded_server(base)
    server.start()
    try:
        yield SecureServer(server, base)
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
    of `settings`, or on `transport` (e.g. ``MemoryBus().transport()``, no server needed).
    On a server that requires authentication and is recorded under ``settings.data_dir``
    (`SecureServer.local`), the agent runs on its own identity, as `mesh run` provisions it."""
    if transport is None:
        settings = await provision(agent, settings)
        transport = await NatsTransport.connect(settings, agent.name)
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
    base = {
        "MESH_TRACE_FILE": str(settings.spans_path),
        **({"MESH_INSECURE": "true"} if settings.insecure else {}),  # as the test said for itself
        **(env or {}),
    }
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


async def replay_file(
    path: str | Path,
    agents: Mapping[str, Agent],
    *,
    ignore: tuple[str, ...] = (),
    live_model: bool = False,
    settle_timeout: float = 30.0,
    llm: LLM | None = None,
) -> Report:
    """Replay a conversation exported by `mesh record --export` through `agents` (name → the
    version to test) on an isolated mesh: `Report.assert_same()` fails with the differences.
    `llm` answers the model calls the journal does not (default: as the settings say)."""
    recording = Recording.load(Path(path))
    return await replay(
        recording,
        agents,
        ignore=ignore,
        live_model=live_model,
        settle_timeout=settle_timeout,
        llm=llm,
    )
