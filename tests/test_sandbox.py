"""Sandboxed tools (mesh.llm.sandbox): what a tool sees from inside its worker (rlimits,
environment, directory, network), kills at the timeout and deaths as tool errors the model
is told about, an agent that keeps serving while a tool blocks, the journal, discovery,
and MCP servers started sandboxed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from conftest import SAMPLES, mesh_cli
from sample_agents import sandboxed
from sample_agents.sandboxed import SbxAnswered, SbxAsk, SbxPing, SbxPong, agent

from mesh.cli.llm import list_tools
from mesh.llm import sandbox
from mesh.llm.journal import Handling, _current, run_tool
from mesh.llm.mcp import import_tools
from mesh.llm.sandbox import Sandbox
from mesh.llm.tools import Tool, Toolbox, ToolFailed, ToolTimeout
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import Recorder, spawn_agent
from mesh.transport.nats import NatsTransport
from mesh.transport.state import MemoryState
from mesh.wire.codec import default_codec
from mesh.wire.errors import RegistrationError
from mesh.wire.settings import Settings

SPEC = f"{SAMPLES / 'sandboxed.py'}:agent"
MCP_SERVER = [sys.executable, str(SAMPLES / "mcp_server.py")]
SECRETS = {
    "ANTHROPIC_API_KEY": "sk-test-secret",
    "MESH_QDRANT_API_KEY": "qdrant-secret",  # a MESH_* setting `mesh run` accepts
    "SBX_VISIBLE": "yes",
}


def _isolation_here() -> str:
    """Which isolation this machine permits, asked of unshare(1) the way the worker asks."""
    for flags, how in ((["--net"], "namespace"), (["--user", "--net"], "user-namespace")):
        if subprocess.run(["unshare", *flags, "true"], capture_output=True, timeout=10).returncode == 0:
            return how
    return "audit-hook"


def _tool(name: str) -> Tool:
    tool = agent.tools.get(name)
    assert tool is not None
    return tool


def _port(settings: Settings) -> int:
    port = urlparse(settings.nats_url or "").port
    assert port is not None
    return port


def _removed(path: str | Path) -> bool:
    return not Path(path).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_tool_sees_its_limits_a_clean_environment_and_a_fresh_directory(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    seen = json.loads(await _tool("probe").run({"port": _port(settings)}))
    assert seen["pid"] != os.getpid()
    assert seen["cpu"] == [3, 4]  # the hard limit a second past: SIGKILL for one ignoring SIGXCPU
    assert seen["memory"] == [256 * 1024 * 1024] * 2
    assert seen["open_files"] == [32, 32]
    assert seen["processes"] == [0, 0]
    # only what the sandbox names (PATH, SBX_VISIBLE); Python adds LC_CTYPE itself (PEP 538)
    assert set(seen["env"]) - {"LC_CTYPE"} == {"PATH", "SBX_VISIBLE"}
    assert seen["env"]["SBX_VISIBLE"] == "yes"
    assert Path(seen["cwd"]).name.startswith("mesh-tool-probe-") and seen["cwd_entries"] == []
    assert Path(seen["cwd"]) != Path.cwd() and _removed(seen["cwd"])


async def test_the_network_is_kept_out_by_a_namespace_here_and_by_the_fallback_otherwise(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = _port(settings)
    seen = json.loads(await _tool("probe").run({"port": port}))
    assert seen["isolation"] == _isolation_here()
    assert seen["network"].startswith("refused: ")  # not even 127.0.0.1, where nats-server listens
    assert await _tool("probe_online").run({"port": port}) == "connected"
    monkeypatch.setattr(sandbox, "NAMESPACES", False)  # as where namespaces are not permitted
    seen = json.loads(await _tool("probe").run({"port": port}))
    assert seen["isolation"] == "audit-hook"
    assert seen["network"].startswith("refused: PermissionError: network access is not allowed")


async def test_a_blocking_tool_is_killed_at_its_timeout_without_blocking_the_caller(tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        with pytest.raises(ToolTimeout, match=r"within 0\.5s; its sandbox process was killed"):
            await _tool("block_briefly").run({"path": str(marker)})
    finally:
        ticker.cancel()
    assert ticks > 0  # this event loop went on while the tool slept
    if marker.exists():  # it got as far as starting to sleep: that process is gone now
        assert not _alive(int(marker.read_text()))


@pytest.mark.parametrize(
    ("tool", "death"),
    [
        ("crash", "its sandbox process died of SIGSEGV"),
        ("spin", "stopped by SIGXCPU: it used up its CPU limit of 1s"),
        ("hog", r"raised MemoryError \(its sandbox allows 200 MB of address space\)"),
    ],
)
async def test_a_worker_that_dies_is_a_tool_error_that_says_how(tool: str, death: str) -> None:
    with pytest.raises(ToolFailed, match=death):
        await _tool(tool).run({})


async def test_a_sandboxed_result_is_journaled_like_any_other(tmp_path: Path) -> None:
    store, runs = MemoryState(), tmp_path / "runs"
    outputs = []
    for _ in range(2):  # the same message handled twice: the second reads the journal
        token = _current.set(Handling(store, "sandboxed", "msg-1"))
        try:
            outputs.append(await run_tool(_tool("count"), {"path": str(runs)}, 30.0))
        finally:
            _current.reset(token)
    assert outputs == ["1 run(s)", "1 run(s)"] and runs.read_text() == "ran\n"


def test_declarations_approval_defaults_and_mistakes() -> None:
    assert _tool("probe").sandbox == sandboxed.LIMITS
    assert _tool("block").sandbox == Sandbox()
    box = Toolbox()

    async def risky(args: sandboxed.Nothing) -> str:
        """Needs a person."""
        return ""

    with pytest.raises(RegistrationError, match="top level of a module"):
        box.register(risky, approval=True)  # sandboxed by default, and a local cannot be imported
    assert box.register(risky, approval=True, sandbox=False).sandbox is None
    assert box.register(sandboxed.count, name="plain").sandbox is None  # not risky: in process
    with pytest.raises(RegistrationError, match="whole number"):
        Sandbox(memory_mb=-1)
    assert _tool("probe").describe()["sandbox"] == {
        "cpu_seconds": 3,
        "memory_mb": 256,
        "open_files": 32,
        "processes": 0,
        "network": False,
        "env": ["PATH", "SBX_VISIBLE"],
    }


async def ask(client: MeshClient, conv: str, text: str) -> SbxAnswered:
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.sbx_answered")
    await client.send("sandboxed", SbxAsk(text=text), conversation=conv)
    [msg] = await rec.wait_count(1, timeout=30)
    await rec.stop()
    return default_codec.decode(msg.data, SbxAnswered)


@pytest.mark.slow
async def test_an_agent_process_keeps_serving_while_a_tool_blocks_and_the_model_is_told(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    env = {**SECRETS, "MESH_LLM": "offline"}
    procs.append(spawn_agent(SPEC, settings, log=tmp_path / "sandboxed.log", env=env))
    await wait_for_agents(client.transport, {"sandboxed": 1})
    marker = tmp_path / "blocking.pid"
    blocked = await Recorder.start(client.transport, "mesh.sbx-block.evt.test.sbx_answered")
    text = f'call block({{"path": "{marker}"}})'
    await client.send("sandboxed", SbxAsk(text=text), conversation="sbx-block")
    for _ in range(300):  # the tool has started (at most 30 s)
        if marker.exists() and marker.read_text():
            break
        await asyncio.sleep(0.1)
    tool_pid = int(marker.read_text())
    pong = await client.request("sandboxed", SbxPing(marker=str(marker)), SbxPong, timeout=10)
    assert pong == SbxPong(tool_pid=tool_pid, tool_alive=True)  # answered while the tool sleeps
    [msg] = await blocked.wait_count(1, timeout=30)
    answer = default_codec.decode(msg.data, SbxAnswered)
    assert answer.outputs == []
    assert answer.errors == [
        "block:timeout:tool 'block': did not finish within 5s; its sandbox process was killed"
    ]
    assert not _alive(tool_pid)

    brief = await ask(client, "sbx-brief", f'call block_briefly({{"path": "{tmp_path / "brief.pid"}"}})')
    killed = "did not finish within 0.5s; its sandbox process was killed"
    assert brief.errors == [f"block_briefly:timeout:tool 'block_briefly': {killed}"]
    # a crash is an error the model is told about; the agent goes on
    crashed = await ask(client, "sbx-crash", "call crash({})")
    assert crashed.errors == ["crash:failed:tool 'crash': its sandbox process died of SIGSEGV"]
    # inside the worker of an agent loaded from a file: no secret, limits, no network
    probed = await ask(client, "sbx-probe", f'call probe({{"port": {_port(settings)}}})')
    [output] = probed.outputs
    seen = json.loads(output)
    assert set(seen["env"]) - {"LC_CTYPE"} == {"PATH", "SBX_VISIBLE"}
    assert seen["memory"] == [256 * 1024 * 1024] * 2 and seen["network"].startswith("refused: ")
    assert procs[0].poll() is None

    assert isinstance(client.transport, NatsTransport)
    found = await list_tools(client.transport, wait=1.0)
    listed = {t["name"]: t for t in found if t["agent"] == "sandboxed"}
    assert listed["probe"]["sandbox"]["env"] == ["PATH", "SBX_VISIBLE"]
    assert listed["probe_online"]["sandbox"]["network"] is True
    assert listed["spin"]["sandbox"]["cpu_seconds"] == 1
    shown = (await mesh_cli(settings, "tools")).stdout
    assert (
        "sandboxed: cpu 3s, memory 256 MB, files 32, processes 0, no network, env PATH SBX_VISIBLE" in shown
    )


def _proc_limits(pid: int) -> str:
    return Path(f"/proc/{pid}/limits").read_text()


def _proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


async def test_an_mcp_server_runs_sandboxed_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    server = await import_tools(Toolbox(), MCP_SERVER, name="calc", timeout=5, env={"CALC_MODE": "test"})
    try:
        assert server.pid is not None
        assert set(_proc_environ(server.pid)) - {"LC_CTYPE"} == {"PATH", "CALC_MODE"}
        assert "Max address space         1073741824" in _proc_limits(server.pid)
        assert os.readlink(f"/proc/{server.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        workdir = Path(os.readlink(f"/proc/{server.pid}/cwd"))
        assert workdir.name.startswith("mesh-mcp-calc-")
        assert [t.sandbox for t in server.tools] == [Sandbox.server()] * len(server.tools)
        assert await server.call_tool("add", {"a": 2, "b": 3}) == "5"
    finally:
        await server.close()
    assert _removed(workdir)

    plain = await import_tools(Toolbox(), MCP_SERVER, name="calc", timeout=5, sandbox=False)
    try:
        assert plain.pid is not None and _proc_environ(plain.pid)["ANTHROPIC_API_KEY"] == "sk-test-secret"
    finally:
        await plain.close()
