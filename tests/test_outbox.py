"""A handler's stored sends: published without waiting for each acknowledgement, waited for
together before the handled message is acknowledged; what cannot be stored leaves that
message unacknowledged, and it is handled again."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest
from sample_agents import handoffs as ho
from sample_agents.echo import Ping, Pong

from mesh import Agent, Context
from mesh.agent.identity import provision
from mesh.join import Gathered
from mesh.runtime.client import MeshClient
from mesh.testing import MemoryBus, Recorder, running_agent
from mesh.transport import outbox as outbox_module
from mesh.transport import streams
from mesh.transport.nats import NatsTransport
from mesh.transport.outbox import Acks, Pipelined
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.settings import Settings


@pytest.fixture
def client(operator: MeshClient) -> MeshClient:
    """The tests watch the streams' acknowledgements and read stored messages: the operator's."""
    return operator


async def stored_per_subject(client: MeshClient, pattern: str) -> Counter[str]:
    js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
    info = await js.stream_info(streams.EVENTS, subjects_filter=pattern)
    return Counter(info.state.subjects or {})


def told(ack: Any) -> str:
    """What an acknowledgement message says (an empty one is +ACK)."""
    return (ack.data.split(b" ")[0] or b"+ACK").decode()


async def test_a_handlers_sends_go_out_before_any_acknowledgement_is_awaited(
    settings: Settings, client: MeshClient
) -> None:
    fan = Agent("fan-out-sends")
    seen: list[int] = []

    @fan.handler
    async def on_ping(ping: Ping, ctx: Context) -> None:
        for i in range(3):
            await ctx.publish(Pong(text=ping.text, n=i, pid=0, instance=ctx.instance))
        assert isinstance(ctx.outbox, Pipelined)
        seen.append(ctx.outbox.pending)  # published, none waited for yet

    async with running_agent(fan, settings):
        rec = await Recorder.start(client.transport, "mesh.pipe-1.evt.test.pong")
        acks = await Recorder.start(client.transport, "$JS.ACK.MESH_EVENTS.fan-out-sends.>")
        await client.publish(Ping(text="three"), conversation="pipe-1")
        pongs = await rec.wait_count(3)
        [ack] = await acks.wait_count(1)
    assert told(ack) == "+ACK"
    assert seen == [3]
    assert sorted(default_codec.decode(m.data, Pong).n for m in pongs) == [0, 1, 2]
    assert sum((await stored_per_subject(client, "mesh.pipe-1.evt.test.pong")).values()) == 3


class RefusingTransport(NatsTransport):
    """Stored sends are refused by the stream (each says it expects another stream, as a
    stream that cannot store it would refuse it) while `refuse` is set."""

    refuse = True

    def outbox(self) -> Pipelined:
        transport = self

        class Refusing(Pipelined):
            async def store(self, subject: str, data: bytes, headers: dict[str, str] | None = None) -> None:
                if transport.refuse:
                    headers = {**(headers or {}), "Nats-Expected-Stream": "NOT_THIS_ONE"}
                await super().store(subject, data, headers)

        return Refusing(self, self._acks)


async def test_sends_that_cannot_be_stored_leave_the_message_unacknowledged_and_it_is_retried(
    settings: Settings, client: MeshClient
) -> None:
    relay = Agent("store-refused")
    attempts: list[int] = []

    @relay.handler
    async def on_ping(ping: Ping, ctx: Context) -> Pong:
        attempts.append(ctx.attempt)
        transport.refuse = ctx.attempt < 2  # the second run's sends are stored
        await ctx.publish(Pong(text="first", n=1, pid=0, instance=ctx.instance))
        return Pong(text="second", n=2, pid=0, instance=ctx.instance)

    settings = await provision(relay, settings)  # its own identity, on a transport of the test's
    transport = await RefusingTransport.connect(settings, "store-refused")

    async with running_agent(relay, settings, transport=transport) as runtime:
        acks = await Recorder.start(client.transport, "$JS.ACK.MESH_EVENTS.store-refused.>")
        await client.publish(Ping(text="x"), conversation="refused-1")
        said = await acks.wait_count(2)  # what the stream was told about the ping, each time
        stats = runtime.stats
    assert [told(m) for m in said] == ["-NAK", "+ACK"]  # handed back, then done
    assert attempts == [1, 2]
    assert (stats.errors, stats.retried, stats.handled) == (1, 1, 1)
    assert "expected stream does not match" in stats.last_error
    stored = await stored_per_subject(client, "mesh.refused-1.evt.test.pong")
    assert stored == Counter({"mesh.refused-1.evt.test.pong": 2})  # each once: the second run's


class Unanswered(Acks):
    """Sends for real, but no acknowledgement reaches the outbox."""

    published = 0

    async def publish(
        self, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> tuple[str, asyncio.Future[None]]:
        self.published += 1
        await self._nc.publish(subject, data, headers=headers)
        return "lost", asyncio.get_running_loop().create_future()


async def test_an_acknowledgement_that_never_comes_is_stored_again_and_kept_once(
    settings: Settings, client: MeshClient, monkeypatch: Any
) -> None:
    monkeypatch.setattr(outbox_module, "ACK_TIMEOUT", 0.2)
    transport = client.transport
    assert isinstance(transport, NatsTransport)
    await transport.ensure_streams()
    acks = Unanswered(transport.nc)
    box = Pipelined(transport, acks)
    headers = client.headers("test.ping", 1, "lost-ack-1", msg_id="lost-ack-1-id")
    await box.store("mesh.lost-ack-1.evt.test.ping", b'{"text": "x"}', headers)
    assert box.pending == 1
    await box.flush()  # the wait runs out: stored again, with the same Nats-Msg-Id
    assert (acks.published, box.pending) == (1, 0)
    stored = await stored_per_subject(client, "mesh.lost-ack-1.evt.test.ping")
    assert stored == Counter({"mesh.lost-ack-1.evt.test.ping": 1})
    got = await transport.stored_last(streams.EVENTS, "mesh.lost-ack-1.evt.test.ping")
    assert got.headers[h.NATS_MSG_ID] == "lost-ack-1-id"


async def test_after_the_run_a_send_waits_for_its_own_acknowledgement(
    settings: Settings, client: MeshClient
) -> None:
    transport = client.transport
    assert isinstance(transport, NatsTransport)
    await transport.ensure_streams()
    box = transport.outbox()
    assert isinstance(box, Pipelined)
    box.close()  # what a task left behind by a handler sends after the handler returned
    await box.store("mesh.late-send-1.evt.test.ping", b'{"text": "x"}', client.headers("test.ping", 1, "c"))
    assert box.pending == 0
    assert await stored_per_subject(client, "mesh.late-send-1.evt.test.ping")


async def test_on_the_memory_bus_each_send_is_stored_when_it_returns() -> None:
    bus = MemoryBus()
    transport = bus.transport()
    await transport.ensure_streams()
    box = transport.outbox()
    await box.store("mesh.mem-1.evt.test.ping", b"{}", {h.NATS_MSG_ID: "m1"})
    assert await transport.stored_last(streams.EVENTS, "mesh.mem-1.evt.test.ping") is not None


panel = Agent("outbox-panel")
votes = panel.join("votes", ho.WorkDone)
completions: list[int] = []
panel_transport: list[RefusingTransport] = []


@panel.handler
async def on_task(task: ho.Task, ctx: Context) -> None:
    await ctx.fan_out(votes, [("worker", ho.Work(text=task.text, n=i)) for i in range(2)])


@votes.complete
async def decide(g: Gathered[ho.WorkDone], ctx: Context) -> ho.Summary:
    completions.append(ctx.attempt)
    panel_transport[0].refuse = len(completions) < 2  # the first completion's answer is refused
    return ho.Summary(text="panel", answers=sorted(w.answer for w in g.results), missing=[], timed_out=False)


async def test_a_join_is_marked_done_only_once_its_completion_is_stored(
    settings: Settings, client: MeshClient
) -> None:
    """If the join were marked done before the completion's answer is stored, the retry of
    the answer that completed it would find it done, and the answer would never be stored."""
    own = await provision(panel, settings)  # its own identity, on a transport of the test's
    transport = await RefusingTransport.connect(own, "outbox-panel")
    transport.refuse = False
    panel_transport.append(transport)
    rec = await Recorder.start(client.transport, "mesh.panel-1.evt.test.summary")
    async with running_agent(ho.worker, settings), running_agent(panel, own, transport=transport):
        await client.send("outbox-panel", ho.Task(text="p", workers=2), conversation="panel-1")
        await rec.wait_count(2)  # the refused attempt and the stored one, as a tap sees them
        async with asyncio.timeout(10):
            while not await stored_per_subject(client, "mesh.panel-1.evt.test.summary"):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    assert completions == [1, 2]
    stored = await stored_per_subject(client, "mesh.panel-1.evt.test.summary")
    assert stored == Counter({"mesh.panel-1.evt.test.summary": 1})
