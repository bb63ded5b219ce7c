"""The `mesh` command: helpful errors, publish validation, schema, up/agents/down."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLES

from mesh.cli.main import cli
from mesh.wire.settings import Settings


def _run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_unknown_command_suggests_the_closest() -> None:
    result = CliRunner().invoke(cli, ["tpa"])
    assert result.exit_code == 2
    assert "Did you mean `mesh tap`?" in result.output


def test_unknown_option_is_named() -> None:
    result = CliRunner().invoke(cli, ["tap", "--jsn"])
    assert result.exit_code == 2
    assert "No such option '--jsn'. Did you mean '--json'?" in result.output


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('{"ticket_id": "T-1", "customer": "Ada"', "not valid JSON"),
        (
            '{"ticket_id": 7, "customer": "A", "subject": "s", "body": "b"}',
            "Expected `str`, got `int` - at `$.ticket_id`",
        ),
        ('{"ticket_id": "T-1"}', "missing required field `customer`"),
    ],
)
def test_publish_rejects_a_bad_body_before_sending(body: str, expected: str, tmp_path: Path) -> None:
    # no server is needed: validation happens first, and nothing is sent
    result = _run("publish", "support.ticket_opened", body, env={"MESH_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_publish_unknown_type_says_where_types_come_from(tmp_path: Path) -> None:
    result = _run("publish", "support.ticket_closed", "{}", env={"MESH_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "unknown message type 'support.ticket_closed'" in result.stderr
    assert "--types" in result.stderr


def test_publish_without_a_server_says_how_to_start_one(tmp_path: Path) -> None:
    body = '{"ticket_id": "T-1", "customer": "A", "subject": "s", "body": "b"}'
    result = _run("publish", "support.ticket_opened", body, env={"MESH_DATA_DIR": str(tmp_path)})
    assert result.returncode == 1
    assert "mesh up" in result.stderr


def test_bad_setting_is_a_clear_error(tmp_path: Path) -> None:
    result = _run("agents", env={"MESH_DATA_DIR": str(tmp_path), "MESH_NAT_URL": "nats://x"})
    assert result.returncode == 2
    assert "MESH_NAT_URL (did you mean MESH_NATS_URL?)" in result.stderr


def test_schema_prints_every_message_type() -> None:
    result = CliRunner().invoke(cli, ["schema", "--types", str(SAMPLES / "echo.py")])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert {"support.ticket_opened@1", "support.reply_drafted@1", "test.ping@1"} <= set(doc["types"])
    ticket = doc["types"]["support.ticket_opened@1"]
    assert ticket["x-mesh-type"] == "support.ticket_opened"
    assert set(ticket["required"]) == {"ticket_id", "customer", "subject", "body"}


def test_publish_to_agent_needs_a_type(tmp_path: Path) -> None:
    result = _run("publish", "agent:triage", "{}", env={"MESH_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert "--type" in result.stderr


@pytest.mark.slow
def test_up_is_found_by_later_commands_and_down_stops_it(tmp_path: Path) -> None:
    env = {"MESH_DATA_DIR": str(tmp_path)}
    up = _run("up", "--detach", env=env)
    try:
        assert up.returncode == 0, up.stderr
        assert "mesh server up: nats://127.0.0.1:" in up.stdout
        again = _run("up", "--detach", env=env)
        assert "already running" in again.stdout
        agents = _run("agents", env=env)
        assert agents.returncode == 0, agents.stderr
        assert "no agents are running" in agents.stdout
        body = '{"ticket_id": "T-9", "customer": "A", "subject": "s", "body": "b"}'
        pub = _run("publish", "support.ticket_opened", body, env=env)
        assert pub.returncode == 0, pub.stderr
    finally:
        down = _run("down", env=env)
    assert "mesh server stopped" in down.stdout
    assert "no mesh server is running" in _run("down", env=env).stdout
    assert Settings.load(environ=env).data_dir == tmp_path


@pytest.mark.slow
def test_up_in_the_foreground_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESH_")},
        "MESH_DATA_DIR": str(tmp_path),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "up"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # printed once the server is up and recorded
        assert first.startswith("mesh server up: nats://127.0.0.1:")
        assert (tmp_path / "server" / "server.json").exists()
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert "mesh server stopped" in out
    assert not (tmp_path / "server" / "server.json").exists()
    assert "no mesh server is running" in _run("down", env={"MESH_DATA_DIR": str(tmp_path)}).stdout


def test_schema_handles_classes_that_share_a_name(tmp_path: Path) -> None:
    for version in (1, 2):
        (tmp_path / f"shared_v{version}.py").write_text(
            "from mesh import Message, message\n"
            f"@message('test.shared', version={version})\n"
            f"class Shared(Message):\n    a: int\n    b{version}: str = ''\n"
        )
    files = f"{tmp_path / 'shared_v1.py'},{tmp_path / 'shared_v2.py'}"
    result = CliRunner().invoke(cli, ["schema", "--types", files])
    assert result.exit_code == 0, result.output
    types = json.loads(result.output)["types"]
    assert "b1" in types["test.shared@1"]["properties"]
    assert "b2" in types["test.shared@2"]["properties"]
    one = json.loads(CliRunner().invoke(cli, ["schema", "--types", files, "test.shared@1"]).output)
    assert list(one["types"]) == ["test.shared@1"]


def test_up_refuses_when_a_nats_url_is_configured(tmp_path: Path) -> None:
    result = _run("up", env={"MESH_DATA_DIR": str(tmp_path), "MESH_NATS_URL": "nats://127.0.0.1:1"})
    assert result.returncode == 2
    assert "unset MESH_NATS_URL" in result.stderr


@pytest.mark.slow
def test_up_requires_authentication_by_default_and_insecure_says_it_does_not(tmp_path: Path) -> None:
    """`mesh up` starts the server with authentication on: a client without credentials is
    refused, while commands on this data dir act with the operator role. `--insecure` turns
    it off and prints a warning."""
    import asyncio

    from mesh.transport.nats import NatsTransport
    from mesh.transport.server import running
    from mesh.wire.errors import ServerError

    env = {"MESH_DATA_DIR": str(tmp_path / "secure")}
    up = _run("up", "--detach", env=env)
    try:
        assert up.returncode == 0, up.stderr
        assert "authentication on" in up.stdout and "WARNING" not in up.stderr
        info = running(Settings.load(environ=env))
        assert info is not None and info.auth
        # a client that says it has no identity gets as far as the server, which refuses it
        anonymous = Settings.load(environ={}, nats_url=info.url, connect_timeout=1.0, insecure=True)
        with pytest.raises(ServerError, match="refused a client without any"):
            asyncio.run(NatsTransport.connect(anonymous, "anonymous"))
        agents = _run("agents", env=env)  # the operator role, from the data dir
        assert agents.returncode == 0, agents.stderr
    finally:
        _run("down", env=env)

    env = {"MESH_DATA_DIR": str(tmp_path / "insecure")}
    up = _run("up", "--insecure", "--detach", env=env)
    try:
        assert up.returncode == 0, up.stderr
        assert "WARNING: --insecure: the server requires no authentication" in up.stderr
        info = running(Settings.load(environ=env))
        assert info is not None and not info.auth
    finally:
        _run("down", env=env)


async def _wait_for_agent(settings: Settings, name: str) -> None:
    from mesh.runtime.discovery import wait_for_agents
    from mesh.transport.identities import with_role
    from mesh.transport.nats import NatsTransport

    transport = await NatsTransport.connect(with_role(settings, "observer"), "test")
    try:
        await wait_for_agents(transport, {name: 1}, timeout=30)
    finally:
        await transport.close()


@pytest.mark.slow
def test_an_agent_run_on_the_secure_server_gets_its_own_identity(tmp_path: Path) -> None:
    """`mesh run` on the data dir of `mesh up`: the agent's identity is issued from its
    declaration, the server reloads, and the agent works on it; `mesh publish` acts as the
    operator."""
    from mesh.agent.launch import spawn_agent, stop_process
    from mesh.transport.server import running

    env = {"MESH_DATA_DIR": str(tmp_path)}
    assert _run("up", "--detach", env=env).returncode == 0
    try:
        info = running(Settings.load(environ=env))
        assert info is not None
        proc = spawn_agent(
            f"{SAMPLES / 'echo.py'}:agent", url=info.url, data_dir=tmp_path, log=tmp_path / "echo.log"
        )
        try:
            asyncio.run(_wait_for_agent(Settings.load(environ=env), "echo"))
            pub = _run(
                "publish", "--types", str(SAMPLES / "echo.py"), "test.ping", '{"text": "hi"}',
                "--wait-for", "test.pong", "--timeout", "30", env=env,
            )  # fmt: skip
            assert pub.returncode == 0, pub.stderr + (tmp_path / "echo.log").read_text()
            assert '"text": "hi"' in pub.stdout
        finally:
            assert stop_process(proc) == 0
        users = json.loads((tmp_path / "auth" / "users.json").read_text())
        echo = next(u for u in users if u["identity"] == "agent:echo")
        assert "mesh.*.direct.echo" in echo["permissions"]["subscribe"]["allow"]
        assert ">" not in echo["permissions"]["publish"]["allow"]
        assert (tmp_path / "auth" / "agents" / "echo" / "echo.creds").stat().st_mode & 0o077 == 0
        assert "Violation" not in (tmp_path / "server" / "nats-server.log").read_text()
    finally:
        _run("down", env=env)


def test_run_without_an_identity_refuses_unless_told_insecure(
    insecure_settings: Settings, tmp_path: Path
) -> None:
    """A server that requires no authentication: an agent with no identity refuses to start
    and says how to give it one; `--insecure` runs it, with a warning."""
    spec = f"{SAMPLES / 'echo.py'}:agent"
    env = {"MESH_NATS_URL": insecure_settings.nats_url or "", "MESH_DATA_DIR": str(tmp_path / "data")}
    refused = _run("run", spec, env=env, timeout=30)
    assert refused.returncode == 2
    assert "no identity" in refused.stderr and "MESH_INSECURE=true" in refused.stderr
    base = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mesh", "run", spec, "--insecure"],
        env={**base, **env, "MESH_LOG_FORMAT": "console"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the agent has started (or the process exits)
            seen.append(line)
            if "agent started" in line:
                break
        out = "".join(seen)
        assert "WARNING: --insecure: this agent has no identity" in out and "agent started" in out
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()
