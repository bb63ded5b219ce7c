"""Handler spans under the mesh's own provider: what they export, how they sample, and what
code in a handler sees, each beside the SDK span the same handler got before."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import opentelemetry.sdk.trace as sdk_trace
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sample_agents import handoffs as ho
from sample_agents.relay import Baton, Finished

import mesh.observability.spans
from mesh import Context
from mesh.agent.declaration import Agent
from mesh.join import Gathered
from mesh.observability.spans import HandlerSpan
from mesh.observability.tracing import (
    JsonLinesSpanExporter,
    read_spans,
    sampler,
    span_record,
    tracer_provider,
    tracing,
)
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.wire import envelope as h
from mesh.wire.envelope import open_envelope
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address

RESOURCE = Resource.create({"service.name": "tracing-test"})
CONVERSATION = "messaging.message.conversation_id"
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
Handler = Callable[[Any, Any], Awaitable[Any]]
_propagator = TraceContextTextMapPropagator()


def sdk_provider(exporter: SpanExporter, sample: float) -> TracerProvider:
    """What `configure_tracing` installed before handler spans were the mesh's own."""
    provider = TracerProvider(resource=RESOURCE, sampler=sampler(sample))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[TracerProvider], None]]:
    """Make a provider the global one for this test (the session's stays installed after)."""
    installed: list[TracerProvider] = []

    def use(provider: TracerProvider) -> None:
        monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
        installed.append(provider)

    yield use
    for provider in installed:
        provider.shutdown()


@pytest.fixture
def same_ids_and_clock(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Resets ids (both paths draw them from `random`) and a fake clock, so two runs of a
    handler give the same span ids and timestamps."""

    def reset(seed: int = 11) -> None:
        random.seed(seed)
        clock = itertools.count(1_700_000_000_000_000_000, 1000).__next__
        monkeypatch.setattr(mesh.observability.spans, "time_ns", clock)
        monkeypatch.setattr(sdk_trace, "time_ns", clock)

    return reset


def envelope(headers: dict[str, str]) -> Any:
    base = {h.TYPE: "test.ping", h.ID: "m-1", h.SENDER: "a", h.HOP: "2", h.CONVERSATION: "conv-1"}
    return open_envelope("mesh.conv-1.agent.b", b"{}", base | headers, "")


async def sends(ctx: Any, msg: Any) -> dict[str, str]:
    """A handler that sends: the trace headers MeshClient would put on its message."""
    headers: dict[str, str] = {}
    _propagator.inject(headers)
    return headers


current: list[trace.Span] = []  # the current span each `handle` call's handler saw


async def handle(
    install: Callable[[TracerProvider], None],
    provider: TracerProvider,
    headers: dict[str, str],
    handler: Handler = sends,
    gathered: tuple[str, ...] = (),
) -> Any:
    """One message through the tracing middleware under `provider`; the handler's result, or
    the error it raised."""
    install(provider)

    async def handler_seen(ctx: Any, msg: Any) -> Any:
        current.append(trace.get_current_span())
        return await handler(ctx, msg)

    call = tracing(handler_seen)
    ctx = SimpleNamespace(
        envelope=envelope(headers), agent="b", join_name="all" if gathered else "", gathered=gathered
    )
    try:
        result = await call(ctx, None)
    except ValueError as exc:
        result = exc
    provider.force_flush()
    return result


def exported(spans: list[ReadableSpan]) -> tuple[bytes, list[str], list[dict[str, Any]]]:
    """A span as each exporter writes it: OTLP, the console's JSON, the span file's line."""
    return (
        encode_spans(spans).SerializeToString(deterministic=True),
        [s.to_json() for s in spans],
        [span_record(s) for s in spans],
    )


async def raises(ctx: Any, msg: Any) -> None:
    raise ValueError("no such order")


async def adds_to_its_span(ctx: Any, msg: Any) -> dict[str, str]:
    span = trace.get_current_span()
    assert span.is_recording()
    span.set_attribute("app.order", 42)
    span.set_attributes({"app.tags": ["a", "b"], "app.bad": {"not": "allowed"}})  # type: ignore[dict-item]
    span.add_event("looked up", {"rows": 3})
    span.set_status(Status(StatusCode.ERROR, "retrying"))
    span.update_name("b process an order")
    with trace.get_tracer("app").start_as_current_span("lookup", attributes={"db": "orders"}):
        return await sends(ctx, msg)


CASES: dict[str, tuple[dict[str, str], Handler, tuple[str, ...]]] = {
    "a sampled parent": ({h.TRACEPARENT: PARENT}, sends, ()),
    "a parent with a random trace id": ({h.TRACEPARENT: PARENT[:-2] + "03"}, sends, ()),
    "a parent with trace state": ({h.TRACEPARENT: PARENT, h.TRACESTATE: "vendor=1,other=x"}, sends, ()),
    "no parent": ({}, sends, ()),
    "a bad traceparent": ({h.TRACEPARENT: "00-" + "0" * 32 + "-b7ad6b7169203331-01"}, sends, ()),
    "a handler that fails": ({h.TRACEPARENT: PARENT}, raises, ()),
    "a handler that adds to its span": ({h.TRACEPARENT: PARENT}, adds_to_its_span, ()),
    "a join": (
        {h.TRACEPARENT: PARENT},
        sends,
        (PARENT, "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01", "not a traceparent"),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_a_handler_span_exports_what_the_sdk_span_did(
    case: str,
    install: Callable[[TracerProvider], None],
    same_ids_and_clock: Callable[..., None],
    tmp_path: Path,
) -> None:
    headers, handler, gathered = CASES[case]
    before, now = InMemorySpanExporter(), InMemorySpanExporter()
    current.clear()

    same_ids_and_clock()
    sdk_result = await handle(install, sdk_provider(before, 1.0), headers, handler, gathered)
    same_ids_and_clock()
    result = await handle(install, tracer_provider(now, RESOURCE, 1.0), headers, handler, gathered)
    same_ids_and_clock()
    span_file = JsonLinesSpanExporter(tmp_path / "spans.jsonl")
    await handle(install, tracer_provider(span_file, RESOURCE, 1.0), headers, handler, gathered)

    assert [type(s) for s in current] == [sdk_trace._Span, HandlerSpan, HandlerSpan]
    old, new = list(before.get_finished_spans()), list(now.get_finished_spans())
    assert old and any(s.name.startswith("b ") for s in old)
    assert exported(new) == exported(old)
    assert type(result) is type(sdk_result) and str(result) == str(sdk_result)  # the same traceparent on
    lines = [json.loads(msgspec.json.encode(span_record(s))) for s in old]
    assert read_spans(tmp_path / "spans.jsonl") == lines


async def test_sampling_decides_as_the_sdk_sampler_did(
    install: Callable[[TracerProvider], None], same_ids_and_clock: Callable[..., None]
) -> None:
    """One new trace in four recorded, by trace id; a remote parent's decision stands
    whatever the fraction, and a trace not recorded still goes on in the headers."""
    unsampled = PARENT[:-2] + "00"
    messages: list[dict[str, str]] = [{}] * 40 + [
        {h.TRACEPARENT: unsampled},
        {h.TRACEPARENT: unsampled[:-2] + "02"},
    ]
    kept = {"before": 0, "now": 0}
    for seed, headers in enumerate(messages):
        before, now = InMemorySpanExporter(), InMemorySpanExporter()
        same_ids_and_clock(seed)
        sdk_sent = await handle(install, sdk_provider(before, 0.25), headers)
        same_ids_and_clock(seed)
        sent = await handle(install, tracer_provider(now, RESOURCE, 0.25), headers)
        assert sent == sdk_sent
        assert exported(list(now.get_finished_spans())) == exported(list(before.get_finished_spans()))
        kept["before"] += len(before.get_finished_spans())
        kept["now"] += len(now.get_finished_spans())
        if headers:  # not recorded: the same trace, a span id of its own, flags unsampled
            trace_id, span_id, flags = sent[h.TRACEPARENT].split("-")[1:]
            assert trace_id == PARENT.split("-")[1] and span_id != PARENT.split("-")[2]
            assert int(flags, 16) & 1 == 0
    assert 0 < kept["now"] < 40 and kept["now"] == kept["before"]

    now = InMemorySpanExporter()
    await handle(install, tracer_provider(now, RESOURCE, 0.0), {h.TRACEPARENT: PARENT})
    assert len(now.get_finished_spans()) == 1  # a sampled parent is followed at 0%


async def test_the_api_in_a_handler_sees_its_span(install: Callable[[TracerProvider], None]) -> None:
    """A handler's span is current and recording: a child span started with the global
    tracer is its child, in its trace, and what the handler sets on it is exported."""
    now = InMemorySpanExporter()
    seen: dict[str, Any] = {}

    async def handler(ctx: Any, msg: Any) -> None:
        span = trace.get_current_span()
        seen["span"] = span
        span.set_attribute("app.user", "ada")
        with trace.get_tracer("app.llm").start_as_current_span("chat") as child:
            seen["child"] = child.get_span_context()
            seen["current in child"] = trace.get_current_span().get_span_context()
        seen["current after"] = trace.get_current_span()

    await handle(install, tracer_provider(now, RESOURCE, 1.0), {h.TRACEPARENT: PARENT}, handler)
    assert isinstance(seen["span"], HandlerSpan)
    assert seen["current after"] is seen["span"]
    assert seen["current in child"] == seen["child"]
    spans = {s.name: s for s in now.get_finished_spans()}
    handler_span, chat = spans["b process test.ping"], spans["chat"]
    assert chat.parent is not None and chat.parent.span_id == handler_span.context.span_id
    assert chat.context.trace_id == handler_span.context.trace_id == int(PARENT.split("-")[1], 16)
    assert handler_span.parent is not None and handler_span.parent.span_id == int(PARENT.split("-")[2], 16)
    assert handler_span.attributes is not None and handler_span.attributes["app.user"] == "ada"
    assert not seen["span"].is_recording()  # ended with the handler


async def test_a_processor_added_later_gets_sdk_spans(install: Callable[[TracerProvider], None]) -> None:
    now, added = InMemorySpanExporter(), InMemorySpanExporter()
    provider = tracer_provider(now, RESOURCE, 1.0)
    provider.add_span_processor(SimpleSpanProcessor(added))
    await handle(install, provider, {h.TRACEPARENT: PARENT})
    assert [s.name for s in added.get_finished_spans()] == ["b process test.ping"]
    assert exported(list(now.get_finished_spans())) == exported(list(added.get_finished_spans()))


@asynccontextmanager
async def agents(settings: Settings, *members: Agent) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for agent in members:
            await stack.enter_async_context(running_agent(agent, settings))
        yield


def relay(name: str, to: str | None, *, first: bool = False) -> Agent:
    agent = Agent(name)

    @agent.handler(events=first)
    async def on_baton(baton: Baton, ctx: Context) -> Finished | None:
        if to is None:
            return Finished(token=baton.token, path=[*baton.path, name])
        await ctx.handoff(to, Baton(token=baton.token, path=[*baton.path, name]))
        return None

    return agent


helper = Agent("tree-helper")


@helper.handler
async def on_work(work: ho.Work) -> ho.WorkDone:
    return ho.WorkDone(text=work.text, n=work.n, answer=f"{work.text}!", by=0)


lead = Agent("tree-lead")
gather = lead.join("all", ho.WorkDone)


@lead.handler
async def on_task(task: ho.Task, ctx: Context) -> None:
    await ctx.fan_out(gather, [("tree-helper", ho.Work(text=task.text, n=i)) for i in range(task.workers)])


async def summarize(g: Gathered[ho.WorkDone], ctx: Context) -> ho.Summary:
    answers = [w.answer for w in g.results]
    return ho.Summary(text=g.results[0].text, answers=answers, missing=g.missing, timed_out=g.timed_out)


gather.complete(summarize)
RELAY = [
    relay("tree-first", "tree-second", first=True),
    relay("tree-second", "tree-third"),
    relay("tree-third", None),
]


async def test_one_conversation_across_agents_is_one_tree(
    settings: Settings,
    client: MeshClient,
    install: Callable[[TracerProvider], None],
) -> None:
    """A relay of three agents, then a fan-out and its join: every span of the conversation
    in one trace, each handler's parent the span of the handler that sent its message, the
    join's span linked to the answers it gathered."""
    spans = InMemorySpanExporter()
    provider = tracer_provider(spans, RESOURCE, 1.0)
    install(provider)
    async with agents(settings, *RELAY, lead, helper):
        rec = await Recorder.start(client.transport, "mesh.tree.>")
        with trace.get_tracer("test").start_as_current_span("client"):
            await client.publish(Baton(token="t"), conversation="tree")
            await client.send(
                "tree-lead",
                ho.Task(text="s", workers=3),
                conversation="tree",
                reply_to=Address.reply("tree", "t").subject,
            )
        await rec.wait_for(lambda ms: {"test.finished", "test.summary"} <= {m.headers[h.TYPE] for m in ms})
    provider.force_flush()
    everything = list(spans.get_finished_spans())
    [root] = [s for s in everything if s.name == "client"]
    conversation = [s for s in everything if (s.attributes or {}).get(CONVERSATION) == "tree"]
    assert len(conversation) == 8  # 3 relays, the task, 3 workers, the join
    assert {s.context.trace_id for s in conversation} == {root.context.trace_id}
    finished = [s for s in everything if s.context.trace_id == root.context.trace_id]
    by_id = {s.context.span_id: s for s in finished}
    for s in finished:
        if s is not root:
            assert s.parent is not None and s.parent.span_id in by_id, s.name

    def parent_name(name: str) -> str:
        [span] = [s for s in finished if s.name == name]
        assert span.parent is not None
        return by_id[span.parent.span_id].name

    assert parent_name("tree-first process test.baton") == "client"
    assert parent_name("tree-second process test.baton") == "tree-first process test.baton"
    assert parent_name("tree-third process test.baton") == "tree-second process test.baton"
    workers = [s for s in finished if s.name == "tree-helper process test.work"]
    [joined] = [s for s in finished if s.name == "tree-lead join all"]
    assert len(workers) == 3
    assert parent_name("tree-lead process test.task") == "client"
    assert {by_id[w.parent.span_id].name for w in workers if w.parent} == {"tree-lead process test.task"}
    assert sorted(link.context.span_id for link in joined.links) == sorted(w.context.span_id for w in workers)
