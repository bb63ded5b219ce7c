"""Parallel and hierarchical handoffs in this process against the real server: policies,
deadlines, resolution, nesting, routes, and the trace of a join."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sample_agents import handoffs as ho

from mesh import Context
from mesh.agent.declaration import Agent
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.errors import RegistrationError
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address


@pytest.fixture(autouse=True)
async def _ledger_url(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    monkeypatch.setenv("MESH_NATS_URL", settings.nats_url or "")
    monkeypatch.setenv("MESH_DATA_DIR", str(settings.data_dir))  # where the ledger finds its account
    yield
    await ho.close_ledger()


@asynccontextmanager
async def agents(settings: Settings, *members: Agent) -> AsyncIterator[list[Any]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(running_agent(a, settings)) for a in members]


async def ask(client: MeshClient, agent: str, msg: Any, conv: str, **kw: Any) -> tuple[Recorder, str]:
    reply_to = Address.reply(conv, "t").subject
    rec = await Recorder.start(client.transport, reply_to)
    await client.send(agent, msg, conversation=conv, reply_to=reply_to, **kw)
    return rec, reply_to


def summary(msg: Any) -> ho.Summary:
    return default_codec.decode(msg.data, ho.Summary)


async def test_fan_out_gathers_all_and_majority_resolves(settings: Settings, client: MeshClient) -> None:
    async with agents(settings, ho.coordinator, ho.worker):
        rec, _ = await ask(client, "coordinator", ho.Task(text="x", workers=3), "join-all")
        [msg] = await rec.wait_count(1)
        s = summary(msg)
        assert s.answers == ["x!", "x!", "x?"]
        assert s.missing == [] and not s.timed_out
        assert s.resolved == "x!"  # two of three agree
        gathered = msg.headers[h.GATHERS].split(",")
        assert len(gathered) == 3


async def test_quorum_completes_on_enough_answers_and_ignores_the_rest(
    settings: Settings, client: MeshClient
) -> None:
    async with agents(settings, ho.coordinator, ho.worker):
        rec, _ = await ask(
            client, "coordinator", ho.Task(text="q", workers=3, policy="quorum", work_ms=100), "join-q"
        )
        [msg] = await rec.wait_count(1)
        s = summary(msg)
        assert len(s.answers) == 2 and len(s.missing) == 1
        with pytest.raises(TimeoutError):  # the third answer arrives, and changes nothing
            await rec.wait_count(2, timeout=1.0)


async def test_first_k_answers_are_explicitly_partial(settings: Settings, client: MeshClient) -> None:
    async with agents(settings, ho.coordinator, ho.worker):
        rec, _ = await ask(
            client, "coordinator", ho.Task(text="f", workers=3, policy="first", work_ms=50), "join-f"
        )
        s = summary((await rec.wait_count(1))[0])
        assert s.answers == ["f!"] and s.missing == ["worker", "worker"]


async def test_deadline_completes_with_what_arrived_and_says_so(
    settings: Settings, client: MeshClient
) -> None:
    async with agents(settings, ho.coordinator, ho.worker):
        # worker n takes 0.3 s * (n + 1): by 0.75 s two of three have answered
        task = ho.Task(text="d", workers=3, work_ms=300, deadline=0.75)
        rec, _ = await ask(client, "coordinator", task, "join-d")
        s = summary((await rec.wait_count(1, timeout=10))[0])
        assert s.timed_out
        assert sorted(s.answers) == ["d!", "d?"] and s.missing == ["worker"]


async def test_a_judge_agent_resolves_disagreement(settings: Settings, client: MeshClient) -> None:
    async with agents(settings, ho.coordinator, ho.worker, ho.judge_agent):
        rec, _ = await ask(client, "coordinator", ho.Task(text="j", workers=2, policy="judged"), "join-j")
        s = summary((await rec.wait_count(1))[0])
        assert s.answers == ["j!", "j?"]
        assert s.resolved == "j!" and "statement" in s.verdict


async def test_hierarchical_delegation_synthesizes_nested_answers(
    settings: Settings, client: MeshClient
) -> None:
    async with agents(settings, ho.supervisor, ho.lead, ho.worker):
        tap = await Recorder.start(client.transport, "mesh.join-h.>")
        rec, _ = await ask(client, "supervisor", ho.Task(text="h"), "join-h")
        s = summary((await rec.wait_count(1))[0])
        assert s.text == "synthesis"
        assert s.answers == ["h/0!", "h/0?", "h/1!", "h/1?"]
        depths = {m.headers.get(h.DEPTH, "0") for m in tap.messages if m.headers.get(h.TYPE) == "test.work"}
        assert depths == {"2"}  # supervisor -> lead (1) -> worker (2)


async def test_delegation_past_the_depth_limit_is_dead_lettered(
    settings: Settings, client: MeshClient, operator: MeshClient
) -> None:
    shallow = settings.model_copy(update={"max_depth": 1})
    async with agents(shallow, ho.supervisor, ho.lead, ho.worker):
        dlq = await Recorder.start(operator.transport, "mesh.join-deep.dlq.lead")  # only it may watch
        await client.send("supervisor", ho.Task(text="deep"), conversation="join-deep")
        dead = await dlq.wait_count(2)  # both leads would go one level too deep
        assert [d.headers[h.DLQ_KIND] for d in dead] == ["depth_limit", "depth_limit"]


async def test_a_declared_route_runs_each_stage_in_order(settings: Settings, client: MeshClient) -> None:
    async with agents(settings, ho.stage_a, ho.stage_b, ho.stage_c):
        rec, _ = await ask(
            client, "stage_a", ho.Chain(conversation="r1"), "route-1", route=["stage_b", "stage_c"]
        )
        [msg] = await rec.wait_count(1)
        assert default_codec.decode(msg.data, ho.ChainDone).marks == ["stage_a", "stage_b", "stage_c"]
        assert msg.headers[h.HOP] == "3"


async def test_the_join_span_links_every_answer_it_gathered(
    settings: Settings, client: MeshClient, spans: InMemorySpanExporter
) -> None:
    spans.clear()
    async with agents(settings, ho.coordinator, ho.worker):
        rec, _ = await ask(client, "coordinator", ho.Task(text="s", workers=3), "join-span")
        [msg] = await rec.wait_count(1)
    [joined] = [s for s in spans.get_finished_spans() if s.name == "coordinator join all"]
    workers = [s for s in spans.get_finished_spans() if s.name == "worker process test.work"]
    trace_ids = {s.context.trace_id for s in [joined, *workers]}
    assert len(trace_ids) == 1  # one conversation, one trace
    assert len(joined.links) == 3
    assert {link.context.trace_id for link in joined.links} == trace_ids
    assert msg.headers[h.TRACEPARENT].split("-")[1] == format(joined.context.trace_id, "032x")


def test_joins_are_checked_at_declaration() -> None:
    a = Agent("decl")
    a.join("one", ho.WorkDone)
    with pytest.raises(RegistrationError, match="already has a join"):
        a.join("one", ho.WorkDone)
    with pytest.raises(RegistrationError, match="name the message type"):
        a.join("two")
    with pytest.raises(RegistrationError, match=r"not a mesh\.Message"):
        a.join("three", int)  # type: ignore[arg-type]


async def test_an_answer_to_a_send_goes_back_once_and_owes_nothing(
    settings: Settings, client: MeshClient
) -> None:
    """asker sends to worker; worker's answer comes to asker's inbox; what asker's handler
    for the answer returns is published as an event, not sent back to asker itself."""
    asker = Agent("asker")

    @asker.handler(events=False)
    async def ask_worker(task: ho.Task, ctx: Context) -> None:
        await ctx.send("worker", ho.Work(text=task.text, n=0))

    @asker.handler(events=False)
    async def on_answer(done: ho.WorkDone, ctx: Context) -> ho.Summary:
        assert h.REPLY_TO not in ctx.envelope.headers
        return ho.Summary(text=done.text, answers=[done.answer], missing=[], timed_out=False)

    async with agents(settings, asker, ho.worker):
        events = await Recorder.start(client.transport, "mesh.owe-1.evt.test.summary")
        dlq = await Recorder.start(client.transport, "mesh.owe-1.dlq.>")
        await client.send("asker", ho.Task(text="o"), conversation="owe-1")
        [summary_msg] = await events.wait_count(1)
        assert summary(summary_msg).answers == ["o!"]
        assert dlq.messages == []


async def test_a_join_timer_held_back_many_times_is_rearmed_not_lost(
    settings: Settings, client: MeshClient
) -> None:
    """Each wait of a deadline timer is a redelivery; with MESH_MAX_DELIVER=2 the timer is
    re-armed as a fresh message instead of running out of deliveries."""
    tight = settings.model_copy(update={"max_deliver": 2})
    async with agents(tight, ho.coordinator, ho.worker) as (coordinator, _):
        task = ho.Task(text="t", workers=2, work_ms=2000, deadline=1.0)
        rec, _ = await ask(client, "coordinator", task, "rearm-1")
        s = summary((await rec.wait_count(1, timeout=15))[0])
        assert s.timed_out and s.answers == []
        assert coordinator.stats.dead_lettered == 0
