"""Tools: schemas from msgspec types, validation before running, timeouts, permissions and
allow lists, typed errors back into the loop, and discovery over the mesh (`mesh tools`)."""

from __future__ import annotations

import msgspec
import pytest
from mesh_user_tools import DELETED, Answered, Ask, OrderQuery, agent

from mesh.cli.llm import list_tools
from mesh.llm.tools import Toolbox, ToolInputInvalid, ToolTimeout
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import Recorder, running_agent
from mesh.wire.codec import default_codec
from mesh.wire.errors import RegistrationError
from mesh.wire.settings import Settings


def test_a_tool_schema_comes_from_its_msgspec_type() -> None:
    tool = agent.tools.get("refund")
    assert tool is not None and tool.approval and tool.permissions == {"payments:write"}
    assert tool.input_schema["type"] == "object"
    assert tool.input_schema["required"] == ["order_id", "amount_eur"]
    assert tool.input_schema["properties"]["amount_eur"] == {"type": "number"}
    assert tool.spec.description.startswith("Refund an order")


async def test_arguments_are_validated_before_the_tool_runs_and_timeouts_hold() -> None:
    lookup = agent.tools.get("lookup_order")
    assert lookup is not None
    assert await lookup.run({"order_id": "A-1"}) == "Order A-1 shipped on Monday"
    with pytest.raises(ToolInputInvalid, match="order_id"):
        await lookup.run({"order": "A-1"})
    with pytest.raises(ToolInputInvalid):
        await lookup.run({"order_id": ["not", "a", "string"]})
    stall = agent.tools.get("stall")
    assert stall is not None
    with pytest.raises(ToolTimeout, match=r"0\.05s"):
        await stall.run({"order_id": "A-1"})


def test_registration_mistakes_fail_with_what_to_write() -> None:
    box = Toolbox()

    def not_async(q: OrderQuery) -> str:
        """x"""
        return ""

    async def no_type(q: str) -> str:
        """x"""
        return ""

    async def no_doc(q: OrderQuery) -> str:
        return ""

    for fn, match in ((not_async, "async def"), (no_type, "msgspec.Struct"), (no_doc, "docstring")):
        with pytest.raises(RegistrationError, match=match):
            box.register(fn)  # type: ignore[arg-type]


async def ask(client: MeshClient, settings: Settings, conv: str, text: str, **data: str) -> Answered:
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.answered")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=text, data=data), conversation=conv)
        [msg] = await rec.wait_count(1)
    await rec.stop()
    return default_codec.decode(msg.data, Answered)


async def test_the_model_calls_a_tool_and_answers_with_its_result(
    client: MeshClient, settings: Settings
) -> None:
    answer = await ask(client, settings, "tools-ok", 'Where is it? call lookup_order({"order_id": "A-7"})')
    assert answer.calls == ["lookup_order"] and answer.errors == []
    assert "Order A-7 shipped on Monday." in answer.text


async def test_bad_tool_calls_become_typed_errors_in_the_loop(client: MeshClient, settings: Settings) -> None:
    text = (
        'call nope({}) call lookup_order({"order": 1}) call delete_account({"user": "ada"}) '
        'call stall({"order_id": "x"}) call lookup_order({"order_id": "A-2"})'
    )
    answer = await ask(client, settings, "tools-bad", text)
    assert answer.errors == [
        "nope:unknown",
        "lookup_order:invalid_input",
        "delete_account:not_allowed",
        "stall:timeout",
    ]
    assert answer.calls == ["lookup_order"]
    assert DELETED == []


async def test_mesh_tools_lists_tools_with_schemas_over_the_mesh(
    client: MeshClient, settings: Settings
) -> None:
    async with running_agent(agent, settings):
        # answering discovery first: a listing's window (`wait`) alone missed it under load
        await wait_for_agents(client.transport, {"clerk": 1}, timeout=30)
        found = await list_tools(client.transport, wait=1.0)  # type: ignore[arg-type]
    mine = {t["name"]: t for t in found if t["agent"] == "clerk"}
    assert set(mine) == {"lookup_order", "refund", "delete_account", "stall"}
    assert mine["refund"]["approval"] is True
    assert mine["lookup_order"]["input_schema"]["properties"] == {"order_id": {"type": "string"}}
    assert msgspec.json.decode(msgspec.json.encode(mine["stall"]))["timeout"] == 0.05
