"""The loop guard (mesh.middleware.loops): two agents bouncing the same message are stopped
after MESH_LOOP_REPEATS rounds with a ``loop_detected`` dead letter, long before
MESH_MAX_HOPS; a chain whose bodies differ at each step passes, however long."""

from __future__ import annotations

import uuid
from collections import Counter

from mesh import Agent, Context, Message, message
from mesh.middleware.loops import HEADER, TRAIL, shape, trail_of
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.settings import Settings


@message("test.loop_ball", version=1)
class Ball(Message):
    text: str
    n: int = 0  # a step counter, when `vary` is on
    vary: bool = False
    last: int = 0  # where a varying chain ends


@message("test.loop_done", version=1)
class Done(Message):
    n: int


def _bouncer(me: str, other: str, handled: Counter[str]) -> Agent:
    """An agent that hands the ball to `other`: unchanged, or counted up until `last`."""
    agent = Agent(me, description="Hands the ball on")

    @agent.handler
    async def on_ball(ball: Ball, ctx: Context) -> Done | None:
        handled[me] += 1
        if ball.vary and ball.n >= ball.last:
            return Done(n=ball.n)
        nxt = Ball(text=ball.text, n=ball.n + 1, vary=True, last=ball.last) if ball.vary else ball
        await ctx.handoff(other, nxt)
        return None

    return agent


def _pair(tag: str) -> tuple[Agent, Agent, Counter[str]]:
    handled: Counter[str] = Counter()
    ping, pong = f"ping{tag}", f"pong{tag}"
    return _bouncer(ping, pong, handled), _bouncer(pong, ping, handled), handled


async def test_two_agents_bouncing_the_same_message_are_stopped_as_a_loop(
    client: MeshClient, operator: MeshClient, settings: Settings
) -> None:
    """ping -> pong -> ping ... with the same body: each direction may come 3 times
    (MESH_LOOP_REPEATS), the 4th ping -> pong is dead-lettered at pong as ``loop_detected``,
    after 7 handlings in all, far below MESH_MAX_HOPS (32)."""
    tag = uuid.uuid4().hex[:6]
    ping, pong, handled = _pair(tag)
    conv = f"loop-{tag}"
    dlq = await Recorder.start(operator.transport, f"mesh.{conv}.dlq.*")
    async with running_agent(ping, settings), running_agent(pong, settings):
        await client.send(ping.name, Ball(text="same again"), conversation=conv)
        [dead] = await dlq.wait_count(1, timeout=20)
    assert dead.headers[h.DLQ_KIND] == "loop_detected"
    assert dead.headers[h.DLQ_AGENT] == pong.name
    assert "came back 3 times" in dead.headers[h.DLQ_REASON]
    assert handled == {ping.name: 4, pong.name: 3}
    assert int(dead.headers[h.HOP]) < settings.max_hops
    assert len(trail_of(dead.headers)) == 7  # what led to it: every handling before


async def test_a_chain_whose_bodies_differ_passes_and_a_person_may_ask_again(
    client: MeshClient, operator: MeshClient, settings: Settings
) -> None:
    """The same two agents, the ball counted up at each step: 12 handoffs back and forth (4
    times the repeats allowed) end in Done; then the same first message sent twice more
    starts two new chains, which are not a loop either. No dead letters."""
    tag = uuid.uuid4().hex[:6]
    ping, pong, handled = _pair(tag)
    conv = f"chain-{tag}"
    dlq = await Recorder.start(operator.transport, f"mesh.{conv}.dlq.*")
    done = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.loop_done")
    async with running_agent(ping, settings), running_agent(pong, settings):
        for _ in range(3):
            await client.send(ping.name, Ball(text="onwards", vary=True, last=12), conversation=conv)
        finished = [default_codec.decode(m.data, Done) for m in await done.wait_count(3, timeout=30)]
    assert [d.n for d in finished] == [12, 12, 12]
    assert sum(handled.values()) == 3 * 13
    assert dlq.messages == []


def test_shapes_and_trails() -> None:
    """A shape depends on type, sender, receiver and body; a trail keeps only well-formed
    shapes, the last `TRAIL` of them."""
    one = shape("t", "a", "b", b'{"x":1}')
    assert one == shape("t", "a", "b", b'{"x":1}')
    assert (
        len(
            {
                one,
                shape("t", "b", "a", b'{"x":1}'),
                shape("t", "a", "b", b'{"x":2}'),
                shape("t", "ab", "", b'{"x":1}'),
            }
        )
        == 4
    )
    listed = ",".join([one] * (TRAIL + 5) + ["nope", "ABCDEF012345"])
    assert trail_of({HEADER: listed}) == [one] * TRAIL
    assert trail_of({}) == []
