"""The embedded nats-server launcher."""

from __future__ import annotations

import os
from pathlib import Path

import nats
import pytest

from mesh.transport import server as srv
from mesh.wire.errors import ServerError
from mesh.wire.settings import Settings


async def test_starts_on_a_free_loopback_port_with_jetstream_and_stops_cleanly(tmp_path: Path) -> None:
    server = srv.EmbeddedServer(tmp_path)
    info = server.start()
    try:
        assert info.url.startswith("nats://127.0.0.1:")
        nc = await nats.connect(info.url)
        account = await nc.jetstream().account_info()
        assert account.limits is not None
        await nc.close()
        assert (tmp_path / "jetstream").is_dir()
    finally:
        server.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(info.pid, 0)


def test_two_servers_get_different_ports(tmp_path: Path) -> None:
    with srv.EmbeddedServer(tmp_path / "a") as a, srv.EmbeddedServer(tmp_path / "b") as b:
        assert a.url != b.url


def test_state_is_found_again_and_ignored_once_the_server_is_gone(tmp_path: Path) -> None:
    settings = Settings.load(environ={"MESH_DATA_DIR": str(tmp_path)})
    with pytest.raises(ServerError, match="mesh up"):
        srv.resolve_url(settings)
    server = srv.EmbeddedServer(srv.server_dir(settings))
    info = server.start()
    srv.write_state(settings, info)
    assert srv.resolve_url(settings) == info.url
    server.kill()
    assert srv.running(settings) is None
    with pytest.raises(ServerError, match="no mesh server is running"):
        srv.resolve_url(settings)


def test_explicit_url_wins(tmp_path: Path) -> None:
    settings = Settings.load(
        environ={"MESH_DATA_DIR": str(tmp_path), "MESH_NATS_URL": "nats://10.1.2.3:4222"}
    )
    assert srv.resolve_url(settings) == "nats://10.1.2.3:4222"


def test_a_reused_pid_is_not_taken_for_the_server(tmp_path: Path) -> None:
    settings = Settings.load(environ={"MESH_DATA_DIR": str(tmp_path)})
    fake = srv.ServerInfo(url="nats://127.0.0.1:1", monitor_url="", pid=os.getpid(), directory=str(tmp_path))
    srv.write_state(settings, fake)
    assert srv.running(settings) is None


def test_one_server_per_directory(tmp_path: Path) -> None:
    with srv.EmbeddedServer(tmp_path), pytest.raises(ServerError, match="another nats-server already runs"):
        srv.EmbeddedServer(tmp_path).start()
    with srv.EmbeddedServer(tmp_path) as again:  # the lock went with the server
        assert again.url
