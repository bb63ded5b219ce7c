"""Declaring agents: handler annotations are read once and mistakes fail with a fix."""

from __future__ import annotations

from typing import Any

import pytest
from sample_agents.echo import Ping, Pong

from mesh import Agent, Context
from mesh.wire.errors import ConfigError, RegistrationError
from mesh.wire.messages import Message


def test_handler_is_picked_by_its_parameter_type() -> None:
    agent = Agent("typed")

    @agent.handler
    async def on_either(msg: Ping | Pong, ctx: Context) -> None: ...

    assert agent.handler_for("test.ping", None) is not None
    assert agent.handler_for("test.pong", 1) is not None
    assert agent.handler_for("test.pong", 2) is None


def test_base_message_class_is_rejected_for_lack_of_a_wire_name() -> None:
    agent = Agent("base")
    with pytest.raises(RegistrationError, match="no wire name"):

        @agent.handler
        async def on_any(msg: Message) -> None: ...


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ("def h(msg: Ping) -> None: ...", "must be `async def`"),
        ("async def h(msg) -> None: ...", "no type annotation"),
        ("async def h(msg: int) -> None: ...", "not a mesh.Message"),
        ("async def h(msg: Ping, ctx: Context, extra: int) -> None: ...", "takes 3 parameters"),
        ("async def h() -> None: ...", "takes 0 parameters"),
    ],
)
def test_bad_handlers_fail_at_declaration_with_what_to_write(source: str, match: str) -> None:
    scope: dict[str, Any] = {"Ping": Ping, "Context": Context}
    exec(source, scope)
    with pytest.raises(RegistrationError, match=match) as info:
        Agent("bad").handler(scope["h"])
    assert "async def handle(msg: MyMessage" in str(info.value)


def test_one_handler_per_type() -> None:
    agent = Agent("dup")

    @agent.handler
    async def a(msg: Ping) -> None: ...

    with pytest.raises(RegistrationError, match="already has a handler"):

        @agent.handler
        async def b(msg: Ping) -> None: ...


@pytest.mark.parametrize("name", ["Bad Name", "", "a.b", "-x", "x" * 65])
def test_agent_names_are_subject_tokens(name: str) -> None:
    with pytest.raises(ConfigError, match="agent name"):
        Agent(name)
