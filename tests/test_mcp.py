"""Tools imported from an MCP server over stdio (mesh.llm.mcp), against the tiny server in
tests/sample_agents/mcp_server.py: listing with schemas and pages, calls through the
toolbox and the tool loop, validation before the call, typed errors for every way a server
can fail, and no process left behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import SAMPLES

from mesh import Agent, Context, Message, message
from mesh.llm.mcp import MCPError, MCPServer, MCPTimeout, import_tools
from mesh.llm.tools import Toolbox, ToolError, ToolFailed, ToolInputInvalid, ToolTimeout
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.wire.codec import default_codec
from mesh.wire.errors import MeshError, RegistrationError
from mesh.wire.settings import Settings

SERVER = [sys.executable, str(SAMPLES / "mcp_server.py")]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_import_lists_every_page_of_tools_with_their_schemas() -> None:
    box = Toolbox()
    server = await import_tools(box, SERVER, name="calc", timeout=5)
    try:
        assert [t.name for t in box] == ["add", "shout", "fail", "crash", "garbage", "hang"]
        add = box.get("add")
        assert add is not None and add.source == "mcp:calc" and add.timeout == 5
        assert add.description == "Add two integers."
        assert add.input_schema["required"] == ["a", "b"]
        assert add.input_schema["properties"]["a"] == {"type": "integer"}
        assert add.describe()["source"] == "mcp:calc"
        assert server.server_info["name"] == "test-server"
        assert server.protocol_version == "2025-06-18"
    finally:
        await server.close()


async def test_calls_run_through_the_toolbox_and_arguments_are_checked_first() -> None:
    box = Toolbox()
    async with await _import(box, allow=["add", "shout", "fail"]) as server:
        assert [t.name for t in server.tools] == ["add", "shout", "fail"]
        add, shout, fail = (box.get(n) for n in ("add", "shout", "fail"))
        assert add is not None and shout is not None and fail is not None
        assert await add.run({"a": 2, "b": 40}) == "42"
        assert await shout.run({"text": "hello"}) == "HELLO\n!"
        with pytest.raises(ToolInputInvalid, match="missing required"):
            await add.run({"a": 1})
        with pytest.raises(ToolInputInvalid, match="must be a integer"):
            await add.run({"a": 1, "b": "2"})
        with pytest.raises(ToolInputInvalid, match="unexpected argument"):
            await shout.run({"text": "x", "loud": True})
        with pytest.raises(ToolFailed, match="the disk is full") as failed:
            await fail.run({})
        assert failed.value.kind == "failed" and not isinstance(failed.value, MCPError)
        assert await add.run({"a": 1, "b": 1}) == "2"  # the server is still fine


async def _import(box: Toolbox, *flags: str, **opts: object) -> MCPServer:
    return await import_tools(box, [*SERVER, *flags], name="calc", timeout=5, **opts)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("tool", "error", "match"),
    [
        ("crash", MCPError, r"exited with code 3.*crashing on purpose"),
        ("garbage", MCPError, "not JSON-RPC: 'this is not json'"),
        ("hang", ToolTimeout, r"did not finish within 0\.3s"),
    ],
)
async def test_a_server_that_misbehaves_gives_a_typed_error_and_no_hang(
    tool: str, error: type[ToolError], match: str
) -> None:
    box = Toolbox()
    server = await import_tools(box, SERVER, name="calc", timeout=0.3, allow=[tool, "add"])
    try:
        t = box.get(tool)
        assert t is not None
        with pytest.raises(error, match=match) as raised:
            await t.run({})
        assert isinstance(raised.value, MeshError) and raised.value.tool == tool
        if tool != "hang":  # the connection is unusable now, and says why at once
            add = box.get("add")
            assert add is not None
            with pytest.raises(MCPError, match=match.split(".")[0]):
                await add.run({"a": 1, "b": 2})
        else:  # a late answer is dropped; the server goes on answering other calls
            assert raised.value.kind == "timeout"
            add = box.get("add")
            assert add is not None and await add.run({"a": 1, "b": 2}) == "3"
    finally:
        await server.close()
    assert server.pid is not None and gone(server.pid)


async def test_a_server_that_never_answers_fails_the_start_in_bounded_time() -> None:
    box = Toolbox()
    with pytest.raises(MCPTimeout, match="initialize"):
        await import_tools(box, [*SERVER, "--silent"], name="mute", start_timeout=0.3)
    assert len(box) == 0


async def test_a_command_that_does_not_start_or_exits_at_once_is_a_typed_error() -> None:
    with pytest.raises(MCPError, match="could not start"):
        await import_tools(Toolbox(), ["/nonexistent/mcp-server"], name="nope")
    with pytest.raises(MCPError, match="exited with code 1"):
        await import_tools(Toolbox(), [sys.executable, "-c", "import sys; sys.exit(1)"], name="dead")


async def test_stderr_is_drained_so_a_chatty_server_does_not_stall() -> None:
    box = Toolbox()
    async with await _import(box, "--noisy", allow=["add"]):
        add = box.get("add")
        assert add is not None
        assert await add.run({"a": 3, "b": 4}) == "7"


async def test_close_kills_a_server_that_ignores_stdin_and_sigterm(tmp_path: Path) -> None:
    server = await _import(Toolbox(), "--stubborn", allow=["add"])
    pid = server.pid
    assert pid is not None and server.running
    await server.close(timeout=0.3)
    assert not server.running and gone(pid)
    await server.close()  # twice is fine


async def test_clashes_allow_and_approval_mistakes_are_registration_errors() -> None:
    box = Toolbox()
    first = await _import(box, allow=["add"], permissions=["calc:use"], approval=["add"])
    try:
        add = box.get("add")
        assert add is not None and add.approval and add.permissions == {"calc:use"}
        with pytest.raises(RegistrationError, match=r"\['add'\] already registered.*prefix=True"):
            await _import(box, allow=["add", "shout"])
        assert [t.name for t in box] == ["add"]  # nothing half-imported
        second = await _import(box, allow=["add"], prefix=True)
        assert [t.name for t in box] == ["add", "calc_add"]
        calc_add = box.get("calc_add")
        assert calc_add is not None and await calc_add.run({"a": 5, "b": 5}) == "10"
        await second.close()
        with pytest.raises(MCPError, match="closed"):
            await calc_add.run({"a": 5, "b": 5})
        with pytest.raises(RegistrationError, match=r"allow names \['nope'\]"):
            await _import(Toolbox(), allow=["nope"])
        with pytest.raises(RegistrationError, match=r"approval names \['nope'\]"):
            await _import(Toolbox(), approval=["nope"])
    finally:
        await first.close()


@message("test.mcp.ask")
class McpAsk(Message, frozen=True):
    text: str


@message("test.mcp.answered")
class McpAnswered(Message, frozen=True):
    text: str
    calls: list[str]
    errors: list[str]


async def test_the_model_calls_mcp_tools_through_run_tools(client: MeshClient, settings: Settings) -> None:
    agent = Agent("mcp-clerk", permissions=["calc:use"])

    @agent.handler(events=False)
    async def on_ask(ask: McpAsk, ctx: Context) -> McpAnswered:
        run = await ctx.run_tools(system="You add numbers.", prompt=ask.text)
        return McpAnswered(
            text=run.text,
            calls=[c.tool for c in run.calls if c.ok],
            errors=[f"{c.tool}:{c.error_kind}" for c in run.calls if not c.ok],
        )

    server = await import_tools(
        agent.tools, SERVER, name="calc", allow=["add", "fail"], permissions=["calc:use"], timeout=5
    )
    text = 'call add({"a": "x", "b": 1}) call fail({}) call add({"a": 20, "b": 22})'
    try:
        rec = await Recorder.start(client.transport, "mesh.mcp-loop.evt.test.mcp.answered")
        async with running_agent(agent, settings):
            await client.send("mcp-clerk", McpAsk(text=text), conversation="mcp-loop")
            [msg] = await rec.wait_count(1)
        await rec.stop()
    finally:
        await server.close()
    answer = default_codec.decode(msg.data, McpAnswered)
    assert answer.errors == ["add:invalid_input", "fail:failed"]
    assert answer.calls == ["add"]
    assert "42" in answer.text


async def test_a_declared_server_is_imported_at_start_and_closed_at_stop(
    client: MeshClient, settings: Settings
) -> None:
    agent = Agent("mcp-declared")
    agent.mcp_server(SERVER, name="calc", allow=["shout"], timeout=5)
    with pytest.raises(RegistrationError, match="already declared"):
        agent.mcp_server(SERVER, name="calc")

    @agent.handler(events=False)
    async def on_ask(ask: McpAsk, ctx: Context) -> McpAnswered:
        run = await ctx.run_tools(system="You shout.", prompt=ask.text)
        return McpAnswered(text=run.text, calls=[c.tool for c in run.calls if c.ok], errors=[])

    assert len(agent.tools) == 0
    rec = await Recorder.start(client.transport, "mesh.mcp-declared.evt.test.mcp.answered")
    async with running_agent(agent, settings):
        [server] = agent.mcp_servers.live
        assert [t.source for t in agent.tools] == ["mcp:calc"]
        text = 'call shout({"text": "hello"})'
        await client.send("mcp-declared", McpAsk(text=text), conversation="mcp-declared")
        [msg] = await rec.wait_count(1)
    await rec.stop()
    answer = default_codec.decode(msg.data, McpAnswered)
    assert answer.calls == ["shout"] and "HELLO" in answer.text
    assert len(agent.tools) == 0 and agent.mcp_servers.live == []
    assert server.pid is not None and gone(server.pid)
