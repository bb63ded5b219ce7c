"""A2A at the edge: mesh agents as A2A agents on the gateway (mesh.gateway.a2a), talked to by
the A2A SDK's own client over a real loopback HTTP server, and a remote A2A agent as a mesh
agent's tool (mesh.llm.a2a), on the session's real nats-server with auth on."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from a2a.client import A2ACardResolver, AgentCardResolutionError, Client, ClientConfig, ClientFactory
from a2a.helpers import get_data_parts, get_text_parts, new_data_part, new_task, new_text_part
from a2a.server.context import ServerCallContext
from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.server.tasks import TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    CancelTaskRequest,
    GetTaskRequest,
    Part,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    StreamResponse,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.types import Message as A2AMessage
from a2a.utils.errors import A2AError, TaskNotFoundError
from conftest import served
from mesh_user_streaming import agent as streamer
from mesh_user_tools import REFUNDS, Refund
from mesh_user_tools import agent as clerk
from sample_agents.echo import agent as echo
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mesh import Agent, Context, Message, message
from mesh.cli.llm import decide
from mesh.gateway.a2a_card import Agents, handler_card
from mesh.gateway.a2a_store import AGENT, PRINCIPAL, RecordedTasks, Running
from mesh.gateway.a2a_tasks import MeshExecutor, MeshRequestHandler, Run
from mesh.gateway.app import Gateway
from mesh.gateway.auth import GatewayAuth
from mesh.llm import a2a_tool
from mesh.llm.a2a import _check_origin
from mesh.llm.tools import ToolFailed, ToolTimeout
from mesh.observability import history
from mesh.observability.tap import TapLine
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.transport.identities import with_role
from mesh.wire.codec import default_codec
from mesh.wire.settings import Settings

TOKEN = "a2a-t0ken-for-the-ci-robot-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
OTHER = {"Authorization": "Bearer another-caller-s-t0ken-9876543210"}


@message("test.a2a_slow")
class SlowJob(Message, frozen=True):
    text: str


@message("test.a2a_ask")
class AskRemote(Message, frozen=True):
    text: str


@message("test.a2a_answered")
class AnsweredRemote(Message, frozen=True):
    text: str
    calls: list[str]
    errors: list[str]


slow = Agent("a2a-slow", description="Works until it is cancelled")
STARTED = asyncio.Event()
STOPPED = asyncio.Event()


@slow.handler
async def on_slow(job: SlowJob, ctx: Context) -> None:
    STARTED.set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        STOPPED.set()  # the mesh's cancellation reached the handler
        raise


broken = Agent("a2a-broken", description="Fails every job")


@broken.handler
async def on_broken(job: SlowJob, ctx: Context) -> None:
    raise RuntimeError("the database is down")


def relay(url: str) -> Agent:
    """An agent whose model may ask the A2A agent at `url` (declared: its card is read at start)."""
    caller = Agent("a2a-caller", description="Asks a remote A2A agent through its tool")
    caller.a2a_agent(url, token=TOKEN, timeout=20)

    @caller.handler(events=False)
    async def on_ask(ask: AskRemote, ctx: Context) -> AnsweredRemote:
        run = await ctx.run_tools(system="You relay questions.", prompt=ask.text)
        return AnsweredRemote(
            text=run.text,
            calls=[c.tool for c in run.calls if c.ok],
            errors=[f"{c.tool}:{c.error_kind}" for c in run.calls if not c.ok],
        )

    return caller


@pytest.fixture
async def gateway(settings: Settings, tmp_path: Path) -> AsyncIterator[str]:
    """The gateway's app served by uvicorn on a loopback port; its base URL."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci={TOKEN}\nother={OTHER['Authorization'][7:]}\n")
    gw = Gateway(with_role(settings, "publisher"), GatewayAuth.load(tokens, environ={}))
    await gw.start()
    try:
        async with served(gw.app) as url:
            yield url
    finally:
        await gw.close()


@asynccontextmanager
async def sdk_client(base: str, agent: str, *, streaming: bool) -> AsyncIterator[Client]:
    """The A2A SDK's client of one agent, from its card (read with the token)."""
    async with httpx.AsyncClient(headers=BEARER, timeout=30) as http:
        factory = ClientFactory(ClientConfig(httpx_client=http, streaming=streaming))
        client = await factory.create_from_url(f"{base}/a2a/{agent}")
        try:
            yield client
        finally:
            await client.close()


def user(*parts: Part, **metadata: Any) -> SendMessageRequest:
    msg = A2AMessage(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=list(parts), metadata=metadata)
    return SendMessageRequest(message=msg)


async def only_task(client: Client, request: SendMessageRequest) -> Task:
    got = [r async for r in client.send_message(request)]
    assert len(got) == 1 and got[0].HasField("task"), got
    return got[0].task


async def test_the_sdk_client_reads_a_card_and_a_message_becomes_a_completed_task(
    settings: Settings, gateway: str
) -> None:
    async with running_agent(echo, settings):
        async with httpx.AsyncClient(headers=BEARER) as http:
            card = await A2ACardResolver(http, f"{gateway}/a2a/echo").get_agent_card()
        assert card.name == "echo" and card.description == "Answers every ping with a pong"
        assert [s.id for s in card.skills] == ["test.ping@1"]
        assert card.supported_interfaces[0].url == f"{gateway}/a2a/echo"
        assert card.supported_interfaces[0].protocol_version == "1.0"
        assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "bearer"
        assert card.capabilities.streaming

        async with sdk_client(gateway, "echo", streaming=False) as client:
            task = await only_task(client, user(new_text_part("hello over a2a")))
            assert task.status.state == TaskState.TASK_STATE_COMPLETED, task
            [result] = [a for a in task.artifacts if a.name == "result"]
            [pong] = get_data_parts(list(result.parts))
            assert pong["text"] == "hello over a2a"
            assert result.metadata["mesh.type"] == "test.pong"

            typed = await only_task(client, user(new_data_part({"text": "typed", "n": 3})))
            [pong] = get_data_parts(list(next(a for a in typed.artifacts if a.name == "result").parts))
            assert pong["text"] == "typed" and pong["n"] == 3

            again = await client.get_task(GetTaskRequest(id=task.id))
            assert again.status.state == TaskState.TASK_STATE_COMPLETED
            assert [a.name for a in again.artifacts] == ["result"]

    # the task is the conversation: the mesh's record has it, under the task id
    async with httpx.AsyncClient(base_url=gateway, headers=BEARER) as web:
        status = (await web.get(f"/v1/conversations/{task.id}")).json()
    assert status["status"] == "done" and status["result"]["body"]["text"] == "hello over a2a"


async def test_a_streamed_answer_arrives_as_artifact_updates_then_the_task_completes(
    settings: Settings, gateway: str
) -> None:
    updates: list[StreamResponse] = []
    request = user(new_text_part("- The mesh streams its answers.\n- Word by word"))
    async with running_agent(streamer, settings), sdk_client(gateway, "streamer", streaming=True) as client:
        async for update in client.send_message(request):
            updates.append(update)
    kinds = [u.WhichOneof("payload") for u in updates]
    assert kinds[-1] == "status_update"
    assert updates[-1].status_update.status.state == TaskState.TASK_STATE_COMPLETED
    streamed = [u.artifact_update for u in updates if u.HasField("artifact_update")]
    chunks = [a for a in streamed if a.artifact.name == "stream"]
    assert len(chunks) > 1 and not chunks[0].append and all(c.append for c in chunks[1:])
    text = "".join(t for c in chunks for t in get_text_parts(list(c.artifact.parts)))
    [final] = [a for a in streamed if a.artifact.name == "result"]
    [answer] = get_data_parts(list(final.artifact.parts))
    assert text == answer["text"] == "The mesh streams its answers. Word by word."
    assert kinds.index("artifact_update") < len(kinds) - 1  # tokens came before the end


async def test_cancelling_a_task_cancels_the_mesh_handler(settings: Settings, gateway: str) -> None:
    STARTED.clear()
    STOPPED.clear()
    async with running_agent(slow, settings), sdk_client(gateway, "a2a-slow", streaming=False) as client:
        request = user(new_text_part("take your time"))
        request.configuration.CopyFrom(SendMessageConfiguration(return_immediately=True))
        task = await only_task(client, request)
        assert task.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING)
        await asyncio.wait_for(STARTED.wait(), 10)
        async with httpx.AsyncClient(base_url=gateway, headers={**OTHER, "A2A-Version": "1.0"}) as web:
            call = {"jsonrpc": "2.0", "id": 1, "method": "CancelTask", "params": {"id": task.id}}
            refused = (await web.post("/a2a/a2a-slow", json=call)).json()
        assert refused["error"]["code"] == -32002 and not STOPPED.is_set()  # not theirs to cancel
        cancelled = await client.cancel_task(CancelTaskRequest(id=task.id))
        assert cancelled.status.state == TaskState.TASK_STATE_CANCELED
        await asyncio.wait_for(STOPPED.wait(), 10)
        seen = await client.get_task(GetTaskRequest(id=task.id))
        assert seen.status.state == TaskState.TASK_STATE_CANCELED


async def first_sse(web: httpx.AsyncClient, agent: str, call: dict[str, Any], headers: dict[str, str]) -> Any:
    """The first thing a streamed JSON-RPC call answers (an SSE event, or a plain JSON body)."""
    async with web.stream("POST", f"/a2a/{agent}", json=call, headers=headers) as r:
        if not r.headers["content-type"].startswith("text/event-stream"):
            return json.loads(await r.aread())
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                return json.loads(line[5:])
    raise AssertionError("the stream ended without an event")


async def test_only_the_caller_that_started_a_task_subscribes_to_it(
    settings: Settings, gateway: str, operator: MeshClient
) -> None:
    REFUNDS.clear()
    mine = 'Please call refund({"order_id": "A-MINE", "amount_eur": 7})'
    async with (
        running_agent(clerk, settings),
        running_agent(slow, settings),
        sdk_client(gateway, "clerk", streaming=False) as client,
        httpx.AsyncClient(base_url=gateway, timeout=10) as web,
    ):
        task = await only_task(client, user(new_text_part(mine)))  # live, waiting for a person
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, task
        # another caller reads its state from the record (as the web view shows conversations) ...
        read = {"jsonrpc": "2.0", "id": 3, "method": "GetTask", "params": {"id": task.id}}
        seen = (await web.post("/a2a/clerk", json=read, headers={**OTHER, "A2A-Version": "1.0"})).json()
        assert seen["result"]["status"]["state"] == "TASK_STATE_INPUT_REQUIRED", seen
        assert "A-MINE" not in json.dumps(seen)  # its state, not the caller's message
        # ... but does not subscribe to it: no history, no streamed artifacts of another caller
        new = {"jsonrpc": "2.0", "id": 1, "method": "SubscribeToTask", "params": {"id": task.id}}
        old = {"jsonrpc": "2.0", "id": 2, "method": "tasks/resubscribe", "params": {"id": task.id}}
        theirs = await asyncio.wait_for(first_sse(web, "clerk", new, {**OTHER, "A2A-Version": "1.0"}), 10)
        theirs_old = await asyncio.wait_for(first_sse(web, "clerk", old, OTHER), 10)
        own = await asyncio.wait_for(first_sse(web, "clerk", new, {**BEARER, "A2A-Version": "1.0"}), 10)
        # a conversation started over REST is no task held here: an error, not a stream that
        # waits for events no one will send
        r = await web.post("/v1/agents/a2a-slow?type=test.a2a_slow", json={"text": "rest"}, headers=BEARER)
        assert r.status_code in (200, 202), r.text
        rest = {**new, "params": {"id": r.json()["conversation"]}}
        v1 = {**BEARER, "A2A-Version": "1.0"}
        unheld = await asyncio.wait_for(first_sse(web, "a2a-slow", rest, v1), 10)
        [asked] = [
            m for m in await history.conversation(operator.transport, task.id) if m.type == "approval.request"
        ]
        await decide(operator, settings, asked.body()["approval"], approved=False, by="ada", reason="test")
    assert theirs["error"]["code"] == -32001 and "A-MINE" not in json.dumps(theirs), theirs
    assert theirs_old["error"]["code"] == -32001 and "A-MINE" not in json.dumps(theirs_old), theirs_old
    assert own["result"]["task"]["id"] == task.id and "A-MINE" in json.dumps(own), own
    assert unheld["error"]["code"] == -32001, unheld
    assert "only a task this caller started" in unheld["error"]["message"]
    assert REFUNDS == []


async def test_a_tool_call_waiting_for_approval_is_input_required_until_a_person_decides(
    settings: Settings, gateway: str, operator: MeshClient
) -> None:
    REFUNDS.clear()
    refund = 'Please call refund({"order_id": "A-2A", "amount_eur": 12})'
    async with running_agent(clerk, settings), sdk_client(gateway, "clerk", streaming=False) as client:
        task = await only_task(client, user(new_text_part(refund)))
        assert task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED, task
        assert "approval" in get_text_parts(list(task.status.message.parts))[0]
        [asked] = [
            m for m in await history.conversation(operator.transport, task.id) if m.type == "approval.request"
        ]
        await decide(operator, settings, asked.body()["approval"], approved=True, by="ada", reason="ok")
        for _ in range(200):  # the task follows the conversation to its end (at most 10 s)
            seen = await client.get_task(GetTaskRequest(id=task.id))
            if seen.status.state == TaskState.TASK_STATE_COMPLETED:
                break
            await asyncio.sleep(0.05)
    assert seen.status.state == TaskState.TASK_STATE_COMPLETED, seen
    assert [Refund(order_id="A-2A", amount_eur=12)] == REFUNDS
    [result] = [a for a in seen.artifacts if a.name == "result"]
    assert get_data_parts(list(result.parts))[0]["calls"] == ["refund"]


async def test_a_conversation_not_started_here_is_a_task_read_from_the_record(
    settings: Settings, gateway: str
) -> None:
    async with running_agent(echo, settings), httpx.AsyncClient(base_url=gateway, headers=BEARER) as web:
        r = await web.post("/v1/agents/echo/request?type=test.ping", json={"text": "over rest"})
        assert r.status_code == 200, r.text
        conversation = r.json()["conversation"]
        async with sdk_client(gateway, "echo", streaming=False) as client:
            task = await client.get_task(GetTaskRequest(id=conversation))
            assert task.id == conversation and task.status.state == TaskState.TASK_STATE_COMPLETED
            [result] = task.artifacts
            assert get_data_parts(list(result.parts))[0]["text"] == "over rest"
            with pytest.raises(A2AError, match="cancel"):  # read, not cancelled, over A2A
                await client.cancel_task(CancelTaskRequest(id=conversation))
        # a conversation the agent of the URL took no part in is no task of it
        call = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": conversation}}
        other = await web.post("/a2a/a2a-slow", json=call, headers={"A2A-Version": "1.0"})
        assert other.json()["error"]["code"] == -32001


async def test_bad_messages_are_invalid_params_with_what_is_wrong(settings: Settings, gateway: str) -> None:
    async with running_agent(echo, settings), sdk_client(gateway, "echo", streaming=False) as client:
        with pytest.raises(A2AError) as bad:
            await only_task(client, user(new_data_part({"text": 5})))
        assert bad.value.data == {"errors": [{"field": "$.text", "message": "Expected `str`, got `int`"}]}
        with pytest.raises(A2AError, match="at most 16 parts"):
            await only_task(client, user(*[new_text_part("x")] * 17))
        with pytest.raises(A2AError, match="does not take a"):
            await only_task(client, user(new_text_part("x"), **{"mesh.type": "test.a2a_slow"}))
        with pytest.raises(A2AError, match="one message per task"):
            follow_up = user(new_text_part("x"))
            follow_up.message.task_id = "some-task"
            await only_task(client, follow_up)


async def test_no_token_no_card_no_call_and_hostile_values_are_refused(
    settings: Settings, gateway: str
) -> None:
    async with running_agent(echo, settings), httpx.AsyncClient(base_url=gateway, timeout=10) as web:
        with pytest.raises(AgentCardResolutionError) as refused:
            await A2ACardResolver(web, f"{gateway}/a2a/echo").get_agent_card()
        assert refused.value.status_code == 401
        call = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}
        r = await web.post("/a2a/echo", json=call)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "X"}
        assert (await web.post("/a2a/echo", json=call, headers=wrong)).status_code == 401
        r = await web.post("/a2a/Bad.Name", json=call, headers=BEARER)
        assert r.status_code == 400 and r.json()["error"] == "invalid_agent"
        r = await web.get("/a2a/no-such-agent/.well-known/agent-card.json", headers=BEARER)
        assert r.status_code == 404 and r.json()["error"] == "unknown_agent"
        big = {**call, "params": {"id": "x" * settings.max_message_bytes}}
        r = await web.post("/a2a/echo", json=big, headers=BEARER)
        assert r.status_code == 413
        # someone else's task, or one of another agent, is not found
        unknown = await web.post("/a2a/echo", json=call, headers={**BEARER, "A2A-Version": "1.0"})
        assert unknown.status_code == 200 and unknown.json()["error"]["code"] == -32001


async def test_public_cards_are_served_without_a_token_but_calls_still_need_one(
    settings: Settings, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci={TOKEN}\n")
    gw = Gateway(with_role(settings, "publisher"), GatewayAuth.load(tokens, environ={}), public_cards=True)
    await gw.start()
    try:
        transport = httpx.ASGITransport(app=gw.app)
        async with (
            running_agent(echo, settings),
            httpx.AsyncClient(transport=transport, base_url="http://gw") as web,
        ):
            card = await web.get("/a2a/echo/.well-known/agent-card.json")
            assert card.status_code == 200 and card.json()["name"] == "echo"
            call = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}
            assert (await web.post("/a2a/echo", json=call)).status_code == 401
    finally:
        await gw.close()


async def test_the_0_3_method_names_are_taken_too(settings: Settings, gateway: str) -> None:
    old = {
        "jsonrpc": "2.0",
        "id": "1",
        "method": "message/send",
        "params": {
            "message": {"role": "user", "messageId": "m-1", "parts": [{"kind": "text", "text": "old"}]}
        },
    }
    new = {"jsonrpc": "2.0", "id": "2", "method": "GetTask", "params": {"id": "x"}}
    async with running_agent(echo, settings), httpx.AsyncClient(base_url=gateway, timeout=30) as web:
        r = await web.post("/a2a/echo", json=old, headers=BEARER)
        unsaid = await web.post("/a2a/echo", json=new, headers=BEARER)  # no A2A-Version: 0.3
    assert "version" in unsaid.json()["error"]["message"].lower()
    assert r.status_code == 200, r.text
    task = r.json()["result"]
    assert task["kind"] == "task" and task["status"]["state"] == "completed"
    assert task["artifacts"][0]["parts"][0]["data"]["text"] == "old"


async def test_a_traced_a2a_callers_trace_goes_on_into_the_mesh(
    settings: Settings, gateway: str, operator: MeshClient
) -> None:
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    call = {
        "jsonrpc": "2.0",
        "id": "1",
        "method": "message/send",
        "params": {
            "message": {"role": "user", "messageId": "m-traced", "parts": [{"kind": "text", "text": "t"}]}
        },
    }
    traced = {**BEARER, "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    async with running_agent(echo, settings), httpx.AsyncClient(base_url=gateway, timeout=30) as web:
        r = await web.post("/a2a/echo", json=call, headers=traced)
    assert r.status_code == 200, r.text
    task = r.json()["result"]
    assert task["status"]["state"] == "completed"
    messages = await history.conversation(operator.transport, task["id"])  # task id = conversation id
    assert {m.trace_id for m in messages} == {trace_id}


async def test_a_mesh_agent_calls_a_remote_a2a_agent_as_a_tool(
    settings: Settings, gateway: str, client: MeshClient
) -> None:
    caller = relay(f"{gateway}/a2a/echo/.well-known/agent-card.json")
    rec = await Recorder.start(client.transport, "mesh.a2a-tool-1.evt.test.a2a_answered")
    async with running_agent(echo, settings), running_agent(caller, settings):
        tool = caller.tools.get("ask_echo")
        assert tool is not None and "Answers every ping with a pong" in tool.description
        assert "test.ping" in tool.description and TOKEN not in repr(tool.describe())
        assert TOKEN not in repr(caller.mcp_servers.specs)
        prompt = 'Ask it. call ask_echo({"text": "relayed over a2a"})'
        await client.send("a2a-caller", AskRemote(text=prompt), conversation="a2a-tool-1")
        [got] = await rec.wait_count(1, timeout=30)
    await rec.stop()
    assert caller.tools.get("ask_echo") is None  # gone with the agent
    answer = default_codec.decode(got.data, AnsweredRemote)
    assert answer.calls == ["ask_echo"] and answer.errors == []
    assert '"text":"relayed over a2a"' in answer.text  # the remote's pong, as the tool's result


async def test_a_remote_agent_that_cannot_be_reached_or_refuses_is_a_tool_error(
    settings: Settings, gateway: str
) -> None:
    with pytest.raises(ToolFailed, match="cannot be read") as unread:
        await a2a_tool(f"{gateway}/a2a/echo", token="not-the-token-" + "x" * 20, timeout=5)
    assert "not-the-token" not in str(unread.value)
    async with running_agent(echo, settings):
        tool = await a2a_tool(f"{gateway}/a2a/echo", token=TOKEN, timeout=20)
        with pytest.raises(ToolFailed, match="refused the call") as refused:
            await tool.run({"data": {"text": 5}})
        assert "$.text" in str(refused.value) and TOKEN not in str(refused.value)


async def test_a_failed_remote_task_is_a_failed_task_and_a_tool_error_with_the_reason(
    settings: Settings, gateway: str
) -> None:
    async with running_agent(broken, settings):
        async with sdk_client(gateway, "a2a-broken", streaming=False) as client:
            task = await only_task(client, user(new_text_part("fail")))
        assert task.status.state == TaskState.TASK_STATE_FAILED
        [said] = get_text_parts(list(task.status.message.parts))
        assert said.startswith("a2a-broken could not handle a test.a2a_slow") and "database is down" in said
        tool = await a2a_tool(f"{gateway}/a2a/a2a-broken", token=TOKEN, timeout=20)
        with pytest.raises(ToolFailed, match=r"the remote task is failed: .*the database is down"):
            await tool.run({"text": "fail again"})


async def test_a_tool_call_given_up_on_cancels_the_remote_task(
    settings: Settings, gateway: str, operator: MeshClient
) -> None:
    marker = f"give up on me {uuid.uuid4().hex}"
    async with running_agent(slow, settings):
        tool = await a2a_tool(f"{gateway}/a2a/a2a-slow", token=TOKEN, timeout=2)
        with pytest.raises(ToolTimeout):
            await tool.run({"text": marker})
        # the remote conversation was cancelled over A2A: its handler stopped, or its message
        # was refused if it had not started yet; either way dead-lettered as cancelled
        reasons: list[str] = []
        for _ in range(200):  # at most 10 s
            for summary in await history.recent(operator.transport, limit=10):
                messages = await history.conversation(operator.transport, summary.id)
                if any(m.type == "test.a2a_slow" and m.body().get("text") == marker for m in messages):
                    reasons = [d.reason for m in messages for d in m.deliveries if d.outcome == "dead_letter"]
            if reasons:
                break
            await asyncio.sleep(0.05)
    assert reasons and "cancelled over A2A" in reasons[0]


def card_to(rpc_url: str) -> AgentCard:
    interface = AgentInterface(url=rpc_url, protocol_binding="JSONRPC", protocol_version="1.0")
    return AgentCard(
        name="elsewhere",
        description="A card whose calls go somewhere else",
        version="1",
        supported_interfaces=[interface],
        capabilities=AgentCapabilities(streaming=False),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="answer", name="answer", description="Answers", tags=["test"])],
    )


async def test_a_card_sending_calls_to_another_origin_is_refused_unless_allowed() -> None:
    """The token goes only to the card's own origin: a card on one loopback port whose
    interface names another port gets no call, and no token, unless that is allowed."""
    seen: list[str] = []

    async def other_rpc(request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization", ""))
        return JSONResponse({"jsonrpc": "2.0", "id": 1, "error": {"code": -32603, "message": "no"}})

    async with served(Starlette(routes=[Route("/rpc", other_rpc, methods=["POST"])])) as other:
        card = agent_card_to_dict(card_to(f"{other}/rpc"))

        async def card_route(request: Request) -> JSONResponse:
            return JSONResponse(card)

        async with served(Starlette(routes=[Route("/.well-known/agent-card.json", card_route)])) as base:
            with pytest.raises(ToolFailed, match="another origin") as refused:
                await a2a_tool(base, token=TOKEN, timeout=5)
            assert TOKEN not in str(refused.value) and "allow_other_origin" in str(refused.value)
            allowed = await a2a_tool(base, token=TOKEN, timeout=5, allow_other_origin=True)
            with pytest.raises(ToolFailed):
                await allowed.run({"text": "hello"})
    assert seen and set(seen) == {f"Bearer {TOKEN}"}  # only once allowed


def test_a_card_never_takes_an_https_agent_to_plain_http() -> None:
    https = "https://agents.example/a2a/x"
    _check_origin("t", https, card_to("https://agents.example/a2a/x/rpc"), False)  # same origin
    _check_origin("t", https, card_to("https://agents.example:443/rpc"), False)  # default port
    with pytest.raises(ToolFailed, match="another origin"):
        _check_origin("t", https, card_to("https://agents.example:8443/rpc"), False)
    _check_origin("t", https, card_to("https://other.example/rpc"), True)
    for allowed in (False, True):
        with pytest.raises(ToolFailed, match="plain http"):
            _check_origin("t", https, card_to("http://agents.example/a2a/x"), allowed)


async def test_running_tasks_are_capped_per_caller_and_in_all(settings: Settings, tmp_path: Path) -> None:
    third = {"Authorization": "Bearer a-third-caller-s-t0ken-5555555555"}
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci={TOKEN}\nother={OTHER['Authorization'][7:]}\nthird={third['Authorization'][7:]}\n")
    gw = Gateway(with_role(settings, "publisher"), GatewayAuth.load(tokens, environ={}))
    gw.a2a.running = Running(per_caller=1, total=2)
    await gw.start()

    def send(text: str) -> dict[str, Any]:
        message = {"role": "ROLE_USER", "messageId": uuid.uuid4().hex, "parts": [{"text": text}]}
        params = {"message": message, "configuration": {"returnImmediately": True}}
        return {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": params}

    try:
        transport = httpx.ASGITransport(app=gw.app)
        async with (
            running_agent(slow, settings),
            httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as web,
        ):

            async def call(who: dict[str, str], body: dict[str, Any]) -> Any:
                return (
                    await web.post("/a2a/a2a-slow", json=body, headers={**who, "A2A-Version": "1.0"})
                ).json()

            first = (await call(BEARER, send("one")))["result"]["task"]["id"]
            over = await call(BEARER, send("two"))
            assert over["error"]["code"] == -32600 and "at most 1" in over["error"]["message"], over
            assert over["error"]["data"][0]["metadata"]["reason"] == "too_many_tasks", over
            bad = send("x")
            bad["params"]["message"]["parts"] = [{"data": {"text": 5}}]
            assert (await call(OTHER, bad))["error"]["code"] == -32602  # checked first: no place taken
            theirs = (await call(OTHER, send("three")))["result"]["task"]["id"]
            busy = await call(third, send("four"))
            assert busy["error"]["code"] == -32600, busy
            assert busy["error"]["data"][0]["metadata"]["reason"] == "gateway_busy", busy
            assert gw.a2a.running.by == {"token:ci": 1, "token:other": 1}

            cancel = {"jsonrpc": "2.0", "id": 2, "method": "CancelTask", "params": {"id": first}}
            assert (await call(BEARER, cancel))["result"]["status"]["state"] == "TASK_STATE_CANCELED"
            for _ in range(200):  # its run ends and gives its place back (at most 10 s)
                if "token:ci" not in gw.a2a.running.by:
                    break
                await asyncio.sleep(0.05)
            again = (await call(third, send("five")))["result"]["task"]["id"]
            assert gw.a2a.running.by == {"token:other": 1, "token:third": 1}
            for who, task_id in ((OTHER, theirs), (third, again)):
                await call(who, {**cancel, "params": {"id": task_id}})
    finally:
        await gw.close()


def finished(task_id: str, text: str) -> Task:
    said = A2AMessage(role=Role.ROLE_USER, message_id=task_id, parts=[new_text_part(text)])
    return new_task(task_id, task_id, TaskState.TASK_STATE_COMPLETED, history=[said])


async def test_finished_tasks_are_kept_within_a_count_and_a_size(operator: MeshClient) -> None:
    context = ServerCallContext(state={PRINCIPAL: "token:ci", AGENT: "echo"})
    by_size = RecordedTasks(operator, kept=100, kept_bytes=25_000)
    for n in range(3):  # a caller's message of 10 kB each: two fit
        await by_size.save(finished(f"big-{n}", "x" * 10_000), context)
    assert await by_size.get("big-0", context) is None
    assert [await by_size.get(f"big-{n}", context) is not None for n in (1, 2)] == [True, True]
    assert 20_000 < by_size.finished_bytes <= 25_000

    by_count = RecordedTasks(operator, kept=2)
    working = new_task("running", "running", TaskState.TASK_STATE_WORKING)
    await by_count.save(working, context)
    for n in range(3):
        await by_count.save(finished(f"small-{n}", "hi"), context)
    assert await by_count.get("small-0", context) is None
    assert await by_count.get("small-2", context) is not None
    assert await by_count.get("running", context) is not None  # a running task is never dropped


class _Updates:
    """What a task's run tells its updater (the artifacts it adds)."""

    task_id = context_id = "a2a-coalesced"

    def __init__(self) -> None:
        self.artifacts = 0

    async def add_artifact(self, *args: Any, **kwargs: Any) -> None:
        self.artifacts += 1


class _Followed(Exception):
    pass


async def test_streamed_tokens_do_not_each_read_the_record(
    operator: MeshClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    updates = _Updates()
    run = Run(operator, "a2a-streamer", cast(TaskUpdater, updates))

    def line(n: int, mtype: str = "llm.chunk") -> TapLine:
        body = {"text": f"t{n} ", "stream": "s1", "seq": n}
        return TapLine(0, 0, "s", "a", "b", mtype, run.conv, f"m{n}", "", 0, None, "", 0, "", "", body)

    async def stream() -> None:
        for n in range(100):
            run._on_line(line(n))
            await asyncio.sleep(0.02)
        run._on_line(line(100, "test.pong"))  # the answer: a message the record will have

    streaming = asyncio.create_task(stream())
    reads = 0

    async def conversation(transport: Any, conv: str) -> list[history.Recorded]:
        nonlocal reads
        reads += 1
        if streaming.done() and run.lines.empty():
            raise _Followed  # all seen: enough
        return []

    monkeypatch.setattr(history, "conversation", conversation)
    with pytest.raises(_Followed):
        await run._follow("m-sent", time.monotonic() + 60)
    assert updates.artifacts == 100  # every token went on, in the stream's artifact
    assert reads <= 8, reads  # not one read of the whole record per token (or per few)


async def test_subscribing_to_a_held_task_no_longer_run_here_is_its_state_not_a_wait(
    operator: MeshClient,
) -> None:
    tasks = RecordedTasks(operator)
    handler = MeshRequestHandler(
        operator,
        Agents(operator.transport, operator.directory),
        MeshExecutor(operator),
        tasks,
        Running(),
        agent_card=handler_card(),
    )
    context = ServerCallContext(state={PRINCIPAL: "token:ci", AGENT: "echo"})
    held = new_task("held-task", "held-task", TaskState.TASK_STATE_WORKING)
    await tasks.save(held, context)  # held, but no run of it here (its run's end raced the call)
    try:
        request = SubscribeToTaskRequest(id="held-task")
        # it ends by itself with the task's state (the SDK's own path waits for a run that is
        # not there); the bound only keeps a hang from stalling the suite
        async with asyncio.timeout(60):
            assert await _all(handler.on_subscribe_to_task(request, context)) == [held]
        stranger = ServerCallContext(state={PRINCIPAL: "token:other", AGENT: "echo"})
        with pytest.raises(TaskNotFoundError, match="only a task this caller started"):
            await _all(handler.on_subscribe_to_task(request, stranger))
    finally:
        await handler.aclose()


async def _all(events: AsyncIterator[Any]) -> list[Any]:
    return [e async for e in events]
