"""A local cluster secured as `mesh up --cluster` secures it (real nats-servers on loopback):
every member refuses a client without an identity and a route without the cluster's
password; an identity issued after the cluster started (an agent's, by `mesh run`) is
admitted by every member, and revoked on every member; `--insecure` keeps the cluster open
and says so.

`secured_cluster` starts one as `mesh up --cluster` does (recorded under the data dir, the
streams made by the operator), so processes on that data dir find its keyring.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

from mesh.agent.launch import spawn_agent, stop_process
from mesh.cli.server import create_streams
from mesh.runtime.discovery import wait_for_agents
from mesh.transport import cluster as cl
from mesh.transport.auth import AgentGrant, connect_options
from mesh.transport.cluster import EmbeddedCluster
from mesh.transport.identities import as_role, embedded_cluster, with_agent, with_role
from mesh.transport.nats import NatsTransport
from mesh.transport.server import ROUTE_USER
from mesh.wire.settings import Settings

pytestmark = pytest.mark.slow

SAMPLES = Path(__file__).parent / "sample_agents"


@asynccontextmanager
async def secured_cluster(data_dir: Path, n: int = 3) -> AsyncIterator[tuple[EmbeddedCluster, Settings]]:
    """A cluster of `n` servers requiring authentication, as `mesh up --cluster n` starts it:
    recorded under `data_dir`, the streams and buckets made by the operator with
    min(n, 3) replicas; the settings of a process on that data dir (no credentials)."""
    settings = Settings.load(environ={}, data_dir=data_dir, trace_exporter="none", replicas=min(n, 3))
    cluster = embedded_cluster(settings, n)
    await asyncio.to_thread(cluster.start)
    try:
        cl.write_state(settings, cluster)
        await create_streams(as_role(settings, cluster, "operator"), cluster.url, buckets=True)
        yield cluster, settings
    finally:
        await asyncio.to_thread(cluster.stop)
        cl.clear_state(settings)


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedCluster, Settings]]:
    async with secured_cluster(tmp_path / "data") as found:
        yield found


async def _connect(url: str, **options: object) -> NatsClient:
    nc = NatsClient()
    try:
        await nc.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **options)
    except BaseException:
        if nc._transport is not None:  # nats-py leaves a refused socket open
            nc._transport.close()
        raise
    return nc


def _route_connect(port: int, user: str = "", password: str = "") -> bytes:
    """What a member answers a process that connects to its route port as a server would."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"INFO ")
        hello = {"verbose": False, "pedantic": False, "user": user, "pass": password, "name": "rogue"}
        connect = json.dumps({**hello, "cluster": cl.CLUSTER_NAME})
        sock.sendall(f"CONNECT {connect}\r\nPING\r\n".encode())
        answer = b""
        while b"PONG" not in answer and b"-ERR" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


async def test_every_member_refuses_clients_without_an_identity_and_routes_without_the_password(
    secured: tuple[EmbeddedCluster, Settings],
) -> None:
    cluster, settings = secured
    assert len(cluster.nodes) == 3 and all(node.auth == cluster.auth for node in cluster.nodes)
    for node in cluster.nodes:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _connect(node.url)
        assert node.routes is not None
        assert b"Authorization Violation" in await asyncio.to_thread(_route_connect, node.routes.port)
        assert b"PONG" in await asyncio.to_thread(
            _route_connect, node.routes.port, ROUTE_USER, cluster.route_secret
        )
        assert (node.directory / "nats.conf").stat().st_mode & 0o077 == 0  # it holds the password
    # the members still route to each other: a message published on n1 reaches a subscriber on n3
    operator = with_role(settings.model_copy(update={"nats_url": cluster.url}), "operator")
    assert operator.nats_creds is not None
    first, last = cluster.nodes[0], cluster.nodes[-1]
    receiver = await _connect(last.url, **connect_options(operator.nats_creds))
    sender = await _connect(first.url, **connect_options(operator.nats_creds))
    try:
        sub = await receiver.subscribe("test.routes")
        await receiver.flush()
        # interest crosses the route a little after the subscriber's own flush: ask until it has
        async with asyncio.timeout(10):
            while True:
                await sender.publish("test.routes", b"across")
                try:
                    msg = await sub.next_msg(timeout=0.2)
                    break
                except nats.errors.TimeoutError:
                    continue
        assert msg.data == b"across"
    finally:
        await sender.close()
        await receiver.close()


async def test_an_identity_issued_after_the_start_is_admitted_and_revoked_on_every_member(
    secured: tuple[EmbeddedCluster, Settings],
) -> None:
    cluster, settings = secured
    on_cluster = settings.model_copy(update={"nats_url": cluster.url})
    mine, issued = await asyncio.to_thread(with_agent, on_cluster, AgentGrant(name="latecomer"))
    assert issued and mine.nats_creds is not None
    for node in cluster.nodes:  # each member on its own: every one has reloaded its users
        nc = await _connect(node.url, **connect_options(mine.nats_creds))
        await nc.flush()
        await nc.close()
    creds = mine.nats_creds.read_bytes()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_DATA_DIR"] = str(settings.data_dir)
    revoke = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mesh", "creds", "revoke", "agent:latecomer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert revoke.returncode == 0, revoke.stderr
    assert "reloaded the 3 servers of the cluster" in revoke.stdout
    kept = settings.data_dir / "latecomer.creds"  # the seed as a deployed copy would keep it
    kept.write_bytes(creds)
    for node in cluster.nodes:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await _connect(node.url, **connect_options(kept))


async def test_mesh_run_on_the_secured_cluster_issues_the_agents_identity_and_it_works(
    secured: tuple[EmbeddedCluster, Settings], tmp_path: Path
) -> None:
    """`mesh run` with the data dir of the cluster (MESH_NATS_URL its client URL, as `mesh up
    --cluster` says to export): the agent's identity is issued, every member reloads, and the
    agent answers `mesh publish`, which acts as the publisher from the same data dir."""
    cluster, settings = secured
    log = tmp_path / "echo.log"
    proc = spawn_agent(f"{SAMPLES / 'echo.py'}:agent", url=cluster.url, data_dir=settings.data_dir, log=log)
    try:
        observer = with_role(settings, "observer")
        transport = await NatsTransport.connect(observer, "test", url=cluster.url)
        try:
            await wait_for_agents(transport, {"echo": 1}, timeout=30)
        finally:
            await transport.close()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update({"MESH_DATA_DIR": str(settings.data_dir), "MESH_NATS_URL": cluster.url})
        pub = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable, "-m", "mesh", "publish", "--types", str(SAMPLES / "echo.py"), "test.ping",
                '{"text": "hi"}', "--wait-for", "test.pong", "--timeout", "30",
            ],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert pub.returncode == 0, pub.stderr + log.read_text()
        assert '"text": "hi"' in pub.stdout
    finally:
        assert stop_process(proc) == 0, log.read_text()
    echo = settings.data_dir / "auth" / "agents" / "echo" / "echo.creds"
    for node in cluster.nodes:
        nc = await _connect(node.url, **connect_options(echo))
        await nc.close()
        assert "Violation" not in node.log_path.read_text()


def test_mesh_up_cluster_insecure_warns_and_admits_anyone(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_DATA_DIR"] = str(tmp_path)

    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh", *args], env=env, capture_output=True, text=True, timeout=60
        )

    up = mesh("up", "--cluster", "2", "--insecure", "--detach")
    try:
        assert up.returncode == 0, up.stderr
        assert "WARNING: --insecure: the cluster's servers require no authentication" in up.stderr
        assert "authentication on" not in up.stdout
        found = cl.running(Settings.load(environ={"MESH_DATA_DIR": str(tmp_path)}))
        assert found is not None and not any(node.auth for node in found[1])

        async def anonymous() -> None:
            for url in found[0].split(","):
                nc = await _connect(url)
                await nc.close()

        asyncio.run(anonymous())
    finally:
        down = mesh("down")
    assert "mesh server stopped" in down.stdout, down.stderr


async def test_a_member_stopped_while_an_identity_is_issued_admits_it_when_started_again(
    secured: tuple[EmbeddedCluster, Settings],
) -> None:
    """The members that run reload; one that was stopped reads the keyring when it starts
    and rejoins its peers with the route password."""
    cluster, settings = secured
    n2 = cluster.node("n2")
    await asyncio.to_thread(n2.stop)
    on_cluster = settings.model_copy(update={"nats_url": cluster.url})
    mine, issued = await asyncio.to_thread(with_agent, on_cluster, AgentGrant(name="whiledown"))
    assert issued and mine.nats_creds is not None
    await asyncio.to_thread(n2.start)
    assert await asyncio.to_thread(cluster.wait_ready) in cluster.names
    for node in cluster.nodes:
        nc = await _connect(node.url, **connect_options(mine.nats_creds))
        await nc.flush()
        await nc.close()
