"""Publish-side middleware: every message a client or an agent sends goes through it."""

from __future__ import annotations

from typing import Any

import pytest
from sample_agents.echo import Ping, Pong

from mesh import Agent, Context
from mesh.middleware.publish import REQUEST, STORE, Outgoing, PublishMiddleware, Send
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.transport.memory import MemoryBus
from mesh.wire import envelope as h
from mesh.wire.errors import PublishError
from mesh.wire.settings import Settings

SETTINGS = Settings.load(environ={})


def watching(seen: list[Outgoing], stamp: str = "") -> PublishMiddleware:
    def mw(call_next: Send) -> Send:
        async def send(out: Outgoing) -> Any:
            seen.append(out)
            if stamp:
                out.headers["X-Stamp"] = stamp
            return await call_next(out)

        return send

    return mw


def refusing(call_next: Send) -> Send:
    async def send(out: Outgoing) -> Any:
        raise PublishError(f"refused {out.subject}")

    return send


async def test_an_agents_sends_go_through_its_publish_middleware_after_the_trace_is_stamped() -> None:
    seen: list[Outgoing] = []
    relay = Agent("relay", publish_middleware=[watching(seen, stamp="relay")])

    @relay.handler
    async def on_ping(ping: Ping, ctx: Context) -> None:
        await ctx.send("echo-sink", ping)

    bus = MemoryBus(SETTINGS)
    watcher = bus.transport()
    inbox = await Recorder.start(watcher, "mesh.*.agent.echo-sink")
    async with running_agent(relay, SETTINGS, transport=bus.transport()):
        client = MeshClient(bus.transport(), "client")
        await client.send("relay", Ping(text="hi"))
        (got,) = await inbox.wait_count(1)
    assert [o.kind for o in seen] == [STORE] and seen[0].subject == got.subject
    # the mesh's own middleware ran first: the trace context is there when this one sees it
    assert h.TRACEPARENT in seen[0].headers
    assert got.headers["X-Stamp"] == "relay"  # what middleware adds travels with the message
    await inbox.stop()


async def test_a_request_goes_through_the_chain_and_its_answer_comes_back() -> None:
    seen: list[Outgoing] = []
    echo = Agent("echo")

    @echo.handler
    async def on_ping(ping: Ping, ctx: Context) -> Pong:
        return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)

    bus = MemoryBus(SETTINGS)
    async with running_agent(echo, SETTINGS, transport=bus.transport()):
        client = MeshClient(bus.transport(), "client", publish_middleware=[watching(seen)])
        pong = await client.request("echo", Ping(text="hi", n=3), Pong, timeout=5)
    assert pong.n == 3
    assert [o.kind for o in seen] == [REQUEST] and seen[0].timeout == 5


async def test_middleware_that_raises_refuses_the_message_and_nothing_is_sent() -> None:
    bus = MemoryBus(SETTINGS)
    watcher = bus.transport()
    everything = await Recorder.start(watcher, ">")
    client = MeshClient(bus.transport(), "client", publish_middleware=[refusing])
    with pytest.raises(PublishError, match="refused mesh"):
        await client.send("echo", Ping(text="hi"))
    with pytest.raises(PublishError):
        await client.send("echo", Ping(text="hi"), durable=False)
    # a message sent after them is the first and only one anybody sees
    await MeshClient(bus.transport(), "client").send("echo", Ping(text="after"))
    (only,) = await everything.wait_count(1)
    assert b"after" in only.data and len(everything.messages) == 1
    await everything.stop()
