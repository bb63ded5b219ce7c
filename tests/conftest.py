"""One real nats-server per test session, on a free loopback port with a temporary store,
requiring authentication as `mesh up` starts it: every agent a test runs (in this process or
as `mesh run`) is on its own identity issued from its declaration, every client on a role.

A test that is about the insecure mode, or needs a server without authentication, asks for
`insecure_settings` and says why."""

from __future__ import annotations

import asyncio
import atexit
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nkeys  # type: ignore[import-untyped]
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.runtime.client import MeshClient
from mesh.testing import SecureServer, nats_server, secure_nats_server, stop_process
from mesh.transport.auth import public_key, read_seed
from mesh.transport.identities import with_role
from mesh.transport.server import EmbeddedServer
from mesh.wire.settings import Settings

# What reads this process's own settings (an agent loaded by its spec, such as the memory
# service, which opens its embedded store as it loads; the CLI run in-process) writes under
# a directory of this test session, never the user's ~/.local/state/mesh: each pytest-xdist
# worker has its own, so two workers never open one embedded store.
_SESSION_DATA = tempfile.mkdtemp(prefix="mesh-tests-")
os.environ.setdefault("MESH_DATA_DIR", _SESSION_DATA)
atexit.register(shutil.rmtree, _SESSION_DATA, True)

HERE = Path(__file__).parent
SAMPLES = HERE / "sample_agents"
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session", autouse=True)
def spans() -> InMemorySpanExporter:
    """The real OpenTelemetry SDK for in-process agents; spans are kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def _test_settings(url: str, data_dir: Path) -> Settings:
    return Settings.load(
        environ={},
        nats_url=url,
        data_dir=data_dir,
        trace_exporter="none",
        log_level="warning",
        # retries and redeliveries in test time
        max_deliver=3,
        retry_backoff=0.05,
        retry_backoff_max=0.2,
        ack_wait=5.0,
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:
    """The session's server, authentication on; its keyring issues each agent's identity
    once (a reload of the server), again only when a declaration asks for other rights."""
    base = Settings.load(environ={}, trace_exporter="none", log_level="warning", connect_timeout=2.0)
    with secure_nats_server(tmp_path_factory.mktemp("nats"), base) as mesh:
        asyncio.run(mesh.prepare())
        yield mesh


@pytest.fixture
def settings(server: SecureServer, tmp_path: Path) -> Settings:
    """No credentials of their own: the server is recorded under the data dir, as `mesh up`
    leaves it, so agents get their identities and `mesh` commands their roles from there."""
    return server.local(_test_settings(server.url, tmp_path / "data"))


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[MeshClient]:
    """A person's or a program's client: it starts work and watches it (the publisher role)."""
    c = await MeshClient.connect(with_role(settings, "publisher"), "test-client")
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def operator(settings: Settings) -> AsyncIterator[MeshClient]:
    """A client of the operator role: dead letters, state, timers and stream administration."""
    c = await MeshClient.connect(with_role(settings, "operator"), "test-operator")
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture(scope="session")
def insecure_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """A server without authentication, for the few tests that need one (each says why)."""
    with nats_server(tmp_path_factory.mktemp("nats-insecure")) as srv:
        yield srv


@pytest.fixture
def insecure_settings(insecure_server: EmbeddedServer, tmp_path: Path) -> Settings:
    # connecting without an identity has to be said (MESH_INSECURE)
    return _test_settings(insecure_server.url, tmp_path / "data").model_copy(update={"insecure": True})


def raw_connect(info: bytes, settings: Settings, **options: object) -> bytes:
    """The CONNECT line of a bare socket (a client that checks nothing), answering the
    server's INFO line with the NKEY of `settings`' credentials when the server asks."""
    nonce = json.loads(info.split(b" ", 1)[1]).get("nonce")
    if nonce and settings.nats_creds is not None:
        seed = read_seed(settings.nats_creds)
        assert seed is not None
        signature = nkeys.from_seed(bytearray(seed)).sign(nonce.encode())
        options.update(nkey=public_key(seed), sig=base64.b64encode(signature).decode())
    return b"CONNECT " + json.dumps(options).encode() + b"\r\n"


TESTS = Path(__file__).parent


async def mesh_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `mesh ...` as its own process, on the machine of `settings` (its server and data
    dir, so it takes its role's identity from there), in a thread: agents in this process
    keep working meanwhile. The test agents are importable by module name (``sample_agents.x``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_NATS_URL": settings.nats_url or "", "MESH_DATA_DIR": str(settings.data_dir)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    argv = [sys.executable, "-m", "mesh", *args]
    return await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Agent processes a test starts; stopped when it ends."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        stop_process(p)


async def stored_dead_letters(transport: Any, stream: str, conversation: str, count: int = 1) -> list[Any]:
    """The conversation's dead letters once `count` are in the stream: a tap sees a letter as
    the server routes it, and the stream may store it a moment later (on a loaded machine)."""
    from mesh.cli.dlq import list_dead_letters

    async with asyncio.timeout(10):
        while True:
            letters = await list_dead_letters(transport, stream, conversation=conversation)
            if len(letters) >= count:
                return letters
            await asyncio.sleep(0.02)


@asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """An ASGI app served by uvicorn on a loopback port, in this event loop; its base URL.
    (httpx's in-process transport would not stream server-sent events.)"""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
    )
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(200):  # listening within 10 s
            if server.started:
                break
            assert not serving.done(), "uvicorn stopped while starting"
            await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)
