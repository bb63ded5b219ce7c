"""A local nats-server cluster: N embedded servers on loopback, routed to each other.

For trying the mesh on a cluster (`mesh up --cluster 3`) and for testing it
(`mesh.testing.nats_cluster`). Each node is an `EmbeddedServer` with its own store,
config and log under ``<directory>/n<i>``; they share a cluster name and know each
other's route ports, so a node that is stopped or killed can be started again and
rejoins. The client URL of the cluster is the members' URLs joined by commas, the form
MESH_NATS_URL takes.

With a keyring (`auth`), every member includes the same ``auth.conf`` (clients authenticate
with the same identities on any member) and routes authenticate with a password made for
this cluster (`Routes.secret`); `mesh.transport.identities.embedded_cluster` makes one so.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import time
import urllib.request
from dataclasses import asdict
from pathlib import Path
from types import TracebackType

from mesh.transport.server import (
    DEFAULT_MAX_PAYLOAD,
    EmbeddedServer,
    Routes,
    ServerInfo,
    is_our_server,
    write_json,
)
from mesh.wire.errors import ServerError
from mesh.wire.settings import Settings

CLUSTER_NAME = "mesh"


class EmbeddedCluster:
    """`n` nats-server processes with JetStream, routed on loopback as one cluster."""

    def __init__(
        self,
        directory: Path,
        n: int = 3,
        *,
        name: str = CLUSTER_NAME,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        tie_to_parent: bool = True,
        sync_always: bool = False,
        auth: Path | None = None,
    ) -> None:
        if n < 1:
            raise ServerError(f"a cluster needs at least one server, not {n}")
        self.directory = Path(directory)
        self.n = n
        self.name = name
        self.max_payload = max_payload
        self.tie_to_parent = tie_to_parent
        self.sync_always = sync_always
        self.auth = auth  # a keyring directory: every member includes its auth.conf
        # kept for the cluster's life, so a member started again rejoins its peers
        self.route_secret = secrets.token_urlsafe(32) if auth is not None else ""
        self.nodes: list[EmbeddedServer] = []

    @property
    def url(self) -> str:
        """The client URL: every member's, comma-separated (for MESH_NATS_URL)."""
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> EmbeddedServer:
        """The member with this server name (``n1`` ... ``n<N>``, as stream info reports leaders)."""
        for node in self.nodes:
            if node.name == name:
                return node
        raise ServerError(f"no server {name!r} in this cluster; its servers are {self.names}")

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def start(self, timeout: float = 30.0) -> list[ServerInfo]:
        """Start every member and wait until they have elected a JetStream meta leader."""
        for attempt in (1, 2, 3):
            self.nodes = self._members(_free_ports(self.n))
            try:
                for node in self.nodes:
                    node.start(timeout)
            except ServerError as exc:
                self.stop()
                # a route port picked as free was taken before the server bound it: pick again
                if "address already in use" in str(exc) and attempt < 3:
                    continue
                raise
            break
        try:
            self.wait_ready(timeout)
        except ServerError:
            self.stop()
            raise
        return [node.info for node in self.nodes if node.info is not None]

    def _members(self, route_ports: list[int]) -> list[EmbeddedServer]:
        members = []
        for i, port in enumerate(route_ports, start=1):
            peers = tuple(p for p in route_ports if p != port)
            routes = Routes(self.name, port, peers, secret=self.route_secret)
            members.append(
                EmbeddedServer(
                    self.directory / f"n{i}",
                    max_payload=self.max_payload,
                    tie_to_parent=self.tie_to_parent,
                    sync_always=self.sync_always,
                    name=f"n{i}",
                    routes=routes,
                    auth=self.auth,
                )
            )
        return members

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait until every running member names the same JetStream meta leader, itself a
        running member; that leader's name. Bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            leader = self.meta_leader()
            if leader:
                return leader
            if time.monotonic() > deadline:
                logs = ", ".join(str(node.log_path) for node in self.nodes)
                raise ServerError(
                    f"the {self.n}-server cluster elected no JetStream meta leader within "
                    f"{timeout:.0f}s; see {logs}"
                )
            time.sleep(0.05)

    def meta_leader(self) -> str:
        """The JetStream meta leader all running members agree on, or '' (none yet, or
        they disagree while an election settles)."""
        views = self.meta_views()
        seen = set(views.values())
        if len(seen) != 1:
            return ""
        [leader] = seen
        return leader if leader in views else ""

    def meta_views(self) -> dict[str, str]:
        """Each running member's JetStream meta leader, as it sees it ('' for none, or when
        its monitoring endpoint does not answer)."""
        views = {}
        for node in self.nodes:
            if not node.running or node.info is None:
                continue
            try:
                with urllib.request.urlopen(f"{node.info.monitor_url}/jsz", timeout=1) as resp:
                    meta = json.loads(resp.read()).get("meta_cluster") or {}
            except (OSError, ValueError):
                meta = {}
            views[node.name] = str(meta.get("leader") or "")
        return views

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every member (SIGTERM, so JetStream flushes), all at once."""
        for node in self.nodes:
            if node.running:
                node.terminate()
        for node in self.nodes:
            node.stop(timeout)

    def __enter__(self) -> EmbeddedCluster:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that are free now. Route ports must be known before the
    servers start (each lists the others'), so they cannot be left to the servers to pick."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


# -- the cluster `mesh up --cluster` started, as recorded for later commands ----------


def cluster_dir(settings: Settings) -> Path:
    return settings.data_dir / "cluster"


def state_path(settings: Settings) -> Path:
    return cluster_dir(settings) / "cluster.json"


def write_state(settings: Settings, cluster: EmbeddedCluster) -> None:
    nodes = [asdict(node.info) for node in cluster.nodes if node.info is not None]
    write_json(state_path(settings), {"url": cluster.url, "nodes": nodes})


def clear_state(settings: Settings) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(settings).unlink()


def running(settings: Settings) -> tuple[str, list[ServerInfo]] | None:
    """The client URL and the live members of the cluster `mesh up --cluster` started under
    this data dir, if any member still runs."""
    try:
        raw = json.loads(state_path(settings).read_text())
        url = str(raw["url"])
        nodes = [ServerInfo(**node) for node in raw["nodes"]]
    except (FileNotFoundError, json.JSONDecodeError, TypeError, KeyError):
        return None
    alive = [node for node in nodes if is_our_server(node.pid, node.directory)]
    return (url, alive) if alive else None


def stop_recorded(settings: Settings, timeout: float = 10.0) -> list[int]:
    """SIGTERM every live member of the recorded cluster and wait for them; their pids."""
    found = running(settings)
    if found is None:
        clear_state(settings)
        return []
    _, alive = found
    for node in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(is_our_server(n.pid, n.directory) for n in alive) and time.monotonic() < deadline:
        time.sleep(0.05)
    clear_state(settings)
    return [node.pid for node in alive]
