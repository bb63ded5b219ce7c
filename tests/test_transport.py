"""The NATS transport's errors: a server without JetStream is named as such, at once."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.transport.nats import NatsTransport
from mesh.transport.server import binary
from mesh.wire.errors import ServerError, ServerUnavailable
from mesh.wire.settings import Settings


@pytest.fixture
def plain_server(tmp_path: Path) -> Iterator[str]:
    """A nats-server without JetStream, on a free loopback port; its URL."""
    proc = subprocess.Popen(
        [str(binary()), "-a", "127.0.0.1", "-p", "-1", "--ports_file_dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ports = tmp_path / f"{binary().name}_{proc.pid}.ports"
    deadline = time.monotonic() + 10
    url = ""
    while not url and proc.poll() is None and time.monotonic() < deadline:
        try:  # written once the server listens
            url = str(json.loads(ports.read_text())["nats"][0])
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.02)
    try:
        assert url, "nats-server did not start"
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


async def test_a_server_without_jetstream_is_named_and_publishes_are_not_retried(
    plain_server: str, tmp_path: Path
) -> None:
    settings = Settings.load(environ={}, nats_url=plain_server, data_dir=tmp_path, insecure=True)
    transport = await NatsTransport.connect(settings, "test")
    try:
        with pytest.raises(ServerError, match="start nats-server with -js") as created:
            await transport.ensure_streams()
        with pytest.raises(ServerError, match="start nats-server with -js") as stored:
            await transport.store("mesh.c1.evt.test.ping", b"{}", {"Nats-Msg-Id": "x"})
    finally:
        await transport.close()
    assert not isinstance(created.value, ServerUnavailable)
    assert not isinstance(stored.value, ServerUnavailable)
    assert transport.publish_retries == 0
