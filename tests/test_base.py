"""The same behaviour on both buses: a real nats-server, and `MemoryBus` in memory. What
passes here is what a user may test without a server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
from msgspec.structs import replace
from sample_agents import relay
from sample_agents.echo import Ping, Pong

from mesh import Agent, Context
from mesh.join import Gathered
from mesh.runtime.client import Lineage, MeshClient
from mesh.testing import MemoryBus, Recorder, running_agent
from mesh.transport.base import Transport
from mesh.transport.identities import with_role
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.errors import RequestFailed
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address


class Bus:
    """Clients and agents on one bus. On the real server a client is on the operator role
    (the tests watch dead letters, which only it may read) and an agent on its own identity
    (`running_agent` connects it: `agent()` is None); in memory, one `MemoryBus`."""

    def __init__(self, settings: Settings, memory: MemoryBus | None) -> None:
        self.settings = settings
        self.memory = memory
        self.opened: list[Transport] = []

    async def client(self, name: str) -> MeshClient:
        if self.memory is not None:
            client = MeshClient(self.memory.transport(), name)
        else:
            client = await MeshClient.connect(with_role(self.settings, "operator"), name)
        self.opened.append(client.transport)
        return client

    def agent(self) -> Transport | None:
        if self.memory is None:
            return None
        transport = self.memory.transport()
        self.opened.append(transport)
        return transport


@pytest.fixture(params=["nats", "memory"])
async def bus(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[Bus]:
    on = Bus(settings, MemoryBus(settings) if request.param == "memory" else None)
    yield on
    for t in on.opened:
        await t.close()


echo = Agent("base-echo")


@echo.handler
async def on_ping(ping: Ping, ctx: Context) -> Pong:
    if ping.text == "boom":
        raise RuntimeError("no pong today")
    return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)


async def test_an_event_is_handled_and_its_answer_published(settings: Settings, bus: Bus) -> None:
    client = await bus.client("client")
    async with running_agent(echo, settings, transport=bus.agent()):
        pongs = await Recorder.start(client.transport, "mesh.base1.evt.test.pong")
        await client.publish(Ping(text="hi", n=1), conversation="base1")
        [pong] = await pongs.wait_count(1)
        assert default_codec.decode(pong.data, Pong).text == "hi"
        assert pong.headers[h.CONVERSATION] == "base1"


async def test_a_request_gets_its_typed_answer(settings: Settings, bus: Bus) -> None:
    client = await bus.client("client")
    async with running_agent(echo, settings, transport=bus.agent()):
        pong = await client.request("base-echo", Ping(text="q", n=7), Pong, timeout=10)
        assert (pong.text, pong.n) == ("q", 7)


async def test_a_request_made_while_the_replica_is_starting_is_answered(settings: Settings, bus: Bus) -> None:
    client = await bus.client("client")
    asking = asyncio.create_task(client.request("base-echo", Ping(text="early", n=1), Pong, timeout=10))
    await asyncio.sleep(0.12)  # the first ask finds nobody; the agent comes up meanwhile
    async with running_agent(echo, settings, transport=bus.agent()):
        pong = await asking
    assert pong.text == "early"


async def test_a_chain_of_handoffs_answers_the_first_sender(settings: Settings, bus: Bus) -> None:
    client = await bus.client("client")
    async with AsyncExitStack() as stack:
        for agent in (relay.first, relay.second, relay.third):
            await stack.enter_async_context(running_agent(agent, settings, transport=bus.agent()))
        done = await Recorder.start(client.transport, "mesh.base3.evt.test.finished")
        await client.send("first", relay.Baton(token="t1"), conversation="base3")
        [finished] = await done.wait_count(1)
        assert [p.split(":")[0] for p in default_codec.decode(finished.data, relay.Finished).path] == [
            "first",
            "second",
            "third",
        ]


async def test_bad_input_is_dead_lettered_and_a_failing_handler_retried_then_dead_lettered(
    settings: Settings, bus: Bus
) -> None:
    client = await bus.client("client")
    async with running_agent(echo, settings, transport=bus.agent()) as runtime:
        dlq = await Recorder.start(client.transport, "mesh.base4.dlq.base-echo")
        headers = client.headers("test.ping", 1, "base4")
        await client.send_raw("mesh.base4.agent.base-echo", b"{not json", headers, store=True)
        await client.send("base-echo", Ping(text="boom"), conversation="base4")
        letters = await dlq.wait_count(2, timeout=20)
        kinds = sorted(m.headers[h.DLQ_KIND] for m in letters)
        assert kinds == ["decode", "handler_error"]
        failed = next(m for m in letters if m.headers[h.DLQ_KIND] == "handler_error")
        assert failed.headers[h.DLQ_DELIVERIES] == str(settings.max_deliver)
        assert runtime.stats.retried == settings.max_deliver - 1


boss = Agent("base-boss")
gather = boss.join("pongs", Pong)
results: list[list[str]] = []


@boss.handler
async def on_task(ping: Ping, ctx: Context) -> None:
    await ctx.fan_out(gather, [("base-echo", Ping(text=f"{ping.text}-{i}", n=i)) for i in range(3)])


@gather.complete
async def on_pongs(got: Gathered[Pong], ctx: Context) -> None:
    results.append(sorted(p.text for p in got.results))


async def test_a_fan_out_is_gathered_once(settings: Settings, bus: Bus) -> None:
    results.clear()
    client = await bus.client("client")
    async with (
        running_agent(echo, settings, transport=bus.agent()),
        running_agent(boss, settings, transport=bus.agent()),
    ):
        await client.send("base-boss", Ping(text="w"), conversation="base5")
        async with asyncio.timeout(10):
            while not results:  # noqa: ASYNC110 - the completion runs in the agent
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert results == [["w-0", "w-1", "w-2"]]


hopper = Agent("base-hopper")
hops: list[tuple[int, int]] = []


@hopper.handler
async def on_hop(ping: Ping, ctx: Context) -> None:
    hops.append((ctx.hop, ctx.depth))
    if ping.n == 0:  # tries to hide how far the work has come, and how deeply it was delegated
        reset = replace(ctx.lineage, hop=0, depth=0)
        await ctx.emit(Address.inbox(ctx.conversation_id, hopper.name), Ping(text=ping.text, n=1), reset)
    elif ping.n == 1:
        await ctx.send(hopper.name, Ping(text=ping.text, n=2))


async def test_a_handler_cannot_count_hops_back_and_work_past_the_limit_is_dead_lettered(
    settings: Settings, bus: Bus
) -> None:
    hops.clear()
    limited = settings.model_copy(update={"max_hops": 2})
    client = await bus.client("client")
    async with running_agent(hopper, limited, transport=bus.agent()):
        dlq = await Recorder.start(client.transport, "mesh.base6.dlq.base-hopper")
        far = Lineage(hop=2, depth=1)  # two hops and one delegation from where it started
        await client.send("base-hopper", Ping(text="h"), conversation="base6", lineage=far)
        [dead] = await dlq.wait_count(1)
        assert (dead.headers[h.DLQ_KIND], dead.headers[h.HOP]) == ("hop_limit", "3")
        assert hops == [(2, 1), (2, 1)]  # the reset lineage was raised to what it received


counter = Agent("base-counter")
counted: list[str] = []


@counter.handler
async def on_count(ping: Ping, ctx: Context) -> Pong:
    counted.append(f"{ctx.sender}:{ping.n}")
    return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)


async def test_a_sender_over_its_quota_is_dead_lettered_and_others_are_not_affected(
    settings: Settings, bus: Bus
) -> None:
    counted.clear()
    # three at once, and then next to nothing: no token comes back while the test runs
    quota = settings.model_copy(update={"sender_rate": 0.001, "sender_burst": 3})
    flood = await bus.client("flood")
    calm = await bus.client("calm")
    async with running_agent(counter, quota, transport=bus.agent()):
        dlq = await Recorder.start(flood.transport, "mesh.base7.dlq.base-counter")
        for n in range(5):
            await flood.send("base-counter", Ping(text="f", n=n), conversation="base7")
        letters = await dlq.wait_count(2)
        assert {m.headers[h.DLQ_KIND] for m in letters} == {"rate_limited"}
        assert {m.headers[h.SENDER] for m in letters} == {"flood"}
        with pytest.raises(RequestFailed) as refused:  # a direct request counts as well
            await flood.request("base-counter", Ping(text="q"), Pong, timeout=10, conversation="base7")
        assert refused.value.kind == "rate_limited"
        pong = await calm.request("base-counter", Ping(text="c", n=9), Pong, timeout=10, conversation="base7")
        assert pong.n == 9
    assert sorted(c.split(":")[0] for c in counted) == ["calm", "flood", "flood", "flood"]
