"""The bus in memory keeps the server's rules the mesh relies on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from sample_agents.echo import Ping, Pong

from mesh.runtime.client import MeshClient
from mesh.transport import streams
from mesh.transport.memory import MemoryBus
from mesh.wire import envelope as h
from mesh.wire.errors import RequestError
from mesh.wire.settings import Settings

SETTINGS = Settings.load(environ={})


async def test_a_stream_keeps_one_copy_per_msg_id_and_a_work_queue_forgets_what_was_acked() -> None:
    t = MemoryBus(SETTINGS).transport()
    first = await t.store("mesh.c.agent.a", b"1", {h.NATS_MSG_ID: "x"})
    again = await t.store("mesh.c.agent.a", b"1", {h.NATS_MSG_ID: "x"})
    other = await t.store("mesh.c.agent.a", b"2", {h.NATS_MSG_ID: "y"})
    assert first == again != other
    got: list[Any] = []

    async def take(d: Any, consumer: Any) -> None:
        got.append(d)
        await d.ack()
        consumer.done()

    spec = streams.consumer_specs("a", [], SETTINGS)[0]
    await t.consume(spec, take, capacity=4)
    async with asyncio.timeout(5):
        while len(got) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert [d.data for d in got] == [b"1", b"2"] and [d.attempt for d in got] == [1, 1]
    with pytest.raises(Exception, match="no message"):
        await t.stored(streams.INBOX, first)  # acknowledged: gone from the work queue
    await t.close()


async def test_a_queue_group_shares_messages_and_a_plain_subscriber_sees_all() -> None:
    bus = MemoryBus(SETTINGS)
    t = bus.transport()
    seen: dict[str, list[bytes]] = {"q1": [], "q2": [], "tap": []}

    def keep(name: str) -> Any:
        async def on(msg: Any) -> None:
            seen[name].append(msg.data)

        return on

    await t.subscribe("x.*", keep("q1"), queue="g")
    await t.subscribe("x.*", keep("q2"), queue="g")
    await t.subscribe("x.>", keep("tap"))
    for i in range(10):
        await t.publish(f"x.{i % 2}", str(i).encode())
    async with asyncio.timeout(5):
        while len(seen["tap"]) < 10:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert sorted(seen["q1"] + seen["q2"]) == sorted(seen["tap"])
    assert seen["q1"] and seen["q2"]
    await t.close()


async def test_nobody_listening_is_no_responders_not_a_timeout() -> None:
    client = MeshClient(MemoryBus(SETTINGS).transport(), "c")
    with pytest.raises(RequestError, match="no replica"):
        await client.request("nobody", Ping(text="?"), Pong, timeout=5)


async def test_unacknowledged_work_comes_back_after_the_ack_wait_until_max_deliver() -> None:
    bus = MemoryBus(SETTINGS)
    t = bus.transport()
    advisories: list[dict[str, Any]] = []

    async def on_advisory(msg: Any) -> None:
        advisories.append(json.loads(msg.data))

    await t.subscribe("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>", on_advisory)
    await t.ensure_streams()
    seq = await t.store("mesh.c.agent.a", b"w")
    attempts: list[int] = []

    async def drop(d: Any, consumer: Any) -> None:  # takes it and never answers: a dead process
        attempts.append(d.attempt)
        consumer.done()

    spec = streams.ConsumerSpec(streams.INBOX, "a", ["mesh.*.agent.a"], ack_wait=0.05, max_deliver=3)
    await t.consume(spec, drop, capacity=1)
    async with asyncio.timeout(5):
        while not advisories:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert attempts == [1, 2, 3]
    assert advisories == [{"stream": streams.INBOX, "stream_seq": seq, "deliveries": 3}]
    await t.close()
