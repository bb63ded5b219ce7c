"""Secrets stay out of logs, errors and dead letters: what counts as one (mesh.wire.secrets),
the log processor that masks them, and a real agent process on a nats-server with a password."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from mesh.observability.logs import Redact, secret_values
from mesh.runtime import deadletter
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import MemoryBus, spawn_agent, stop_process
from mesh.transport.nats import NatsTransport
from mesh.transport.server import EmbeddedServer
from mesh.wire.errors import ConfigError, ServerError
from mesh.wire.secrets import is_secret_header, redact_url, without_secrets
from mesh.wire.settings import Settings

HERE = Path(__file__).parent
ECHO = f"{HERE / 'sample_agents' / 'echo.py'}:agent"
PASSWORD = "s3cret-Pa55word"
API_KEY = "sk-ant-test-0123456789abcdef"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://app:pw@n1:4222", "nats://app:***@n1:4222"),
        ("nats://app:pw@n1:4222,nats://app:pw@n2:4222", "nats://app:***@n1:4222,nats://app:***@n2:4222"),
        ("nats://s3cr3t-token@n1:4222", "nats://***@n1:4222"),  # a token alone is the secret
        ("tls://:pw@n1", "tls://***@n1"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("cannot connect to nats://a:b@h: refused", "cannot connect to nats://a:***@h: refused"),
        ("mail me at someone@example.com", "mail me at someone@example.com"),
    ],
)
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_credential_headers_are_secret_and_the_mesh_s_own_are_not() -> None:
    for name in ("Authorization", "proxy-authorization", "Cookie", "Set-Cookie", "X-Api-Key", "X-Auth-Token",
                 "Client-Secret", "X-DB-Password", "apikey", "X-Tenant-Pin"):  # fmt: skip
        assert is_secret_header(name, {"x-tenant-pin"}), name
    for name in ("Mesh-Type", "Mesh-Sender", "Nats-Msg-Id", "traceparent", "Content-Type", "Kunde"):
        assert not is_secret_header(name, {"x-tenant-pin"}), name
    kept, dropped = without_secrets({"Cookie": "a", "Kunde": "b", "x-api-key": "c"})
    assert (kept, dropped) == ({"Kunde": "b"}, ["Cookie", "x-api-key"])


def test_the_log_processor_masks_passwords_keys_and_credential_fields() -> None:
    values = secret_values({"ANTHROPIC_API_KEY": API_KEY, "MESH_LOG_LEVEL": "debug", "GITHUB_TOKEN": "short"})
    assert values == [API_KEY]  # short values are too likely to be ordinary words
    event = Redact(values)(
        None,
        "error",
        {
            "event": f"call failed with key {API_KEY}",
            "url": f"nats://app:{PASSWORD}@h:4222",
            "api_key": "anything",
            "input_tokens": 12,
            "headers": {"Authorization": "Bearer x", "Kunde": "Müller"},
        },
    )
    assert event == {
        "event": "call failed with key ***",
        "url": "nats://app:***@h:4222",
        "api_key": "***",
        "input_tokens": 12,
        "headers": {"Authorization": "***", "Kunde": "Müller"},
    }


def test_an_invalid_secret_setting_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as raised:
        Settings.load(environ={"MESH_QDRANT_API_KEY": API_KEY, "MESH_SECRET_HEADERS": "Mesh-Type"})
    assert "MESH_SECRET_HEADERS" in str(raised.value)
    assert repr(Settings.load(environ={"MESH_QDRANT_API_KEY": API_KEY})).count(API_KEY) == 0
    assert PASSWORD not in repr(Settings.load(environ={"MESH_NATS_URL": f"nats://a:{PASSWORD}@h"}))


class PasswordServer(EmbeddedServer):
    """The embedded server with one user and password."""

    def _config(self, ports_dir: Path) -> dict[str, object]:
        return {**super()._config(ports_dir), "authorization": {"user": "app", "password": PASSWORD}}


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL, with its password, of a nats-server that needs one."""
    server = PasswordServer(tmp_path_factory.mktemp("locked"))
    info = server.start()
    try:
        yield info.url.replace("nats://", f"nats://app:{PASSWORD}@")
    finally:
        server.stop()


@pytest.mark.slow
async def test_an_agent_process_logs_no_password_and_no_api_key(locked: str, tmp_path: Path) -> None:
    settings = Settings.load(environ={}, nats_url=locked, data_dir=tmp_path, trace_exporter="none")
    log = tmp_path / "echo.log"
    proc = spawn_agent(
        ECHO,
        settings,
        log=log,
        env={"ANTHROPIC_API_KEY": API_KEY, "MESH_LLM": "offline", "MESH_LOG_LEVEL": "debug"},
    )
    try:
        async with MeshClient(await NatsTransport.connect(settings, "probe"), "probe") as client:
            assert PASSWORD not in client.transport.connected_url
            await wait_for_agents(client.transport, {"echo": 1})
    finally:
        assert stop_process(proc) == 0
    text = log.read_text()
    started = next(json.loads(line) for line in text.splitlines() if '"agent started"' in line)
    assert started["url"].startswith("nats://127.0.0.1:")  # the server, never its user part
    assert PASSWORD not in text and API_KEY not in text


def test_a_command_that_cannot_connect_does_not_print_the_password(locked: str, tmp_path: Path) -> None:
    wrong = locked.replace(PASSWORD, PASSWORD + "-wrong")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_NATS_URL": wrong, "MESH_DATA_DIR": str(tmp_path), "MESH_CONNECT_TIMEOUT": "1"})
    done = subprocess.run(
        [sys.executable, "-m", "mesh", "agents"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert PASSWORD not in done.stdout + done.stderr
    assert "nats://app:***@127.0.0.1" in done.stderr


async def test_connect_errors_show_the_url_without_its_password(locked: str, tmp_path: Path) -> None:
    wrong = locked.replace(PASSWORD, PASSWORD + "-wrong")
    settings = Settings.load(environ={}, nats_url=wrong, data_dir=tmp_path, connect_timeout=1)
    with pytest.raises(ServerError) as raised:
        await NatsTransport.connect(settings, "probe")
    assert PASSWORD not in str(raised.value)
    assert "nats://app:***@" in str(raised.value)


async def test_a_dead_letter_that_cannot_be_stored_is_logged_without_its_secret_headers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logged: list[dict[str, object]] = []
    monkeypatch.setattr(deadletter.log, "error", lambda event, **fields: logged.append(fields), raising=False)
    monkeypatch.setattr(deadletter.log, "warning", lambda event, **fields: None, raising=False)
    transport = MemoryBus().transport()

    async def refuse(subject: str, data: bytes, headers: dict[str, str] | None = None) -> int:
        raise ServerError("the server is gone")

    monkeypatch.setattr(transport, "store", refuse)
    msg = SimpleNamespace(
        subject="mesh.c1.agent.billing",
        data=b"{}",
        headers={"Mesh-Type": "test.ping", "Authorization": "Bearer sk-live-1", "Kunde": "Müller"},
    )
    assert not await deadletter.dead_letter(transport, agent="billing", msg=msg, kind="decode", reason="x")
    [fields] = logged
    assert fields["headers"] == {"Mesh-Type": "test.ping", "Kunde": "Müller"}
    assert fields["masked"] == ["Authorization"]
