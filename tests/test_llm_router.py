"""The router's parts without a network or a clock: circuit breaker, token bucket, limits,
backoff, fallback, and the accounting of tokens and cost as metrics and span attributes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.llm import (
    CircuitBreaker,
    Limits,
    LLMError,
    LLMUnavailable,
    Metering,
    OfflineLLM,
    Reply,
    Request,
    Router,
    Text,
    TokenBucket,
    Turn,
    Usage,
)
from mesh.llm.metering import Scope, _scope
from mesh.llm.router import backoff
from mesh.llm.types import Base, StreamEvent


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Flaky(Base):
    """A provider that fails the first `failures` calls with `error`, then answers."""

    system = "test"

    def __init__(self, name: str, failures: int, error: LLMError) -> None:
        self.name = self.model = name
        self.failures = failures
        self.error = error
        self.calls = 0

    async def chat(self, request: Request) -> Reply:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return Reply(content=[Text(f"{self.name} ok")], usage=Usage(100, 20), model="claude-sonnet-4-5")

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        yield await self.chat(request)


async def no_sleep(seconds: float) -> None:
    pass


REQ = Request(messages=[Turn.user("q")])


def test_breaker_opens_after_repeated_failures_and_probes_before_closing() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failures=3, reset_after=10, clock=clock)
    for _ in range(2):
        breaker.failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 10
    assert breaker.allow()  # the probe
    assert breaker.state == "half_open" and not breaker.allow()  # only one probe at a time
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now += 10
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow() and breaker.allow()


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=3, clock=clock)
    assert [bucket.try_take() for _ in range(3)] == [0, 0, 0]
    assert bucket.try_take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.try_take() == 0
    clock.now += 100
    assert [bucket.try_take() for _ in range(4)][-1] > 0  # refilled to the burst, not beyond


async def test_limits_bound_concurrency_per_agent_and_tenant() -> None:
    limits = Limits(rate=1000, burst=1000, concurrency=2)
    inside, peak = 0, 0
    gate = asyncio.Event()

    async def call(agent: str) -> None:
        nonlocal inside, peak
        async with limits.hold("t", agent):
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1

    tasks = [asyncio.create_task(call(a)) for a in ("a", "b", "c")]
    for _ in range(20):  # let every task run as far as it can
        await asyncio.sleep(0)
    assert inside == 2  # the tenant's limit holds the third back
    gate.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert peak == 2


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    assert [backoff(n, 0.5, 3.0, lambda: 1.0) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff(3, 0.5, 3.0, lambda: 0.25) == 0.75


async def test_router_falls_back_in_order_and_the_breaker_skips_a_dead_provider() -> None:
    dead = Flaky("dead", 1000, LLMError("dead: HTTP 503", retryable=True, status=503))
    spare = Flaky("spare", 0, LLMError("never"))
    router = Router([dead, spare], retries=1, sleep=no_sleep, breaker=lambda: CircuitBreaker(failures=4))
    for _ in range(2):
        assert (await router.chat(REQ)).text == "spare ok"
    assert dead.calls == 4 and router.breakers["dead"].state == "open"
    assert (await router.chat(REQ)).text == "spare ok"
    assert dead.calls == 4  # skipped while open


async def test_router_does_not_retry_a_non_retryable_error_and_reports_all_failures() -> None:
    bad = Flaky("bad", 1000, LLMError("bad: HTTP 400", status=400))
    worse = Flaky("worse", 1000, LLMError("worse: HTTP 429", retryable=True, status=429))
    router = Router([bad, worse], retries=2, sleep=no_sleep)
    with pytest.raises(LLMUnavailable) as err:
        await router.chat(REQ)
    assert bad.calls == 1 and worse.calls == 3
    assert "bad: HTTP 400" in str(err.value) and "worse: HTTP 429" in str(err.value)


async def test_tokens_and_cost_are_metered_per_call_agent_and_conversation() -> None:
    reader = InMemoryMetricReader()
    metering = Metering(MeterProvider(metric_readers=[reader]))
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    router = Router(
        [Flaky("claude", 0, LLMError("x"))],
        metering=metering,
        tracer=tracer_provider.get_tracer("t"),
    )
    token = _scope.set(Scope("acme", "writer", "conv-1"))
    try:
        await router.chat(REQ)
        await router.chat(REQ)
    finally:
        _scope.reset(token)
    ledger = metering.ledger
    assert ledger.agents["writer"].input_tokens == 200 and ledger.agents["writer"].output_tokens == 40
    assert ledger.conversations["conv-1"].calls == 2
    assert ledger.conversations["conv-1"].cost_usd == pytest.approx(2 * (100 * 3 + 20 * 15) / 1e6)
    [span, _] = spans.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.system"] == "test"
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "claude"
    assert attrs["gen_ai.usage.input_tokens"] == 100
    assert attrs["gen_ai.usage.output_tokens"] == 20
    assert attrs["mesh.conversation"] == "conv-1"
    data = reader.get_metrics_data()
    assert data is not None
    metrics = {m.name: m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    usage = metrics["gen_ai.client.token.usage"]
    points = list(usage.data.data_points)
    by_type = {p.attributes["gen_ai.token.type"]: p for p in points}  # type: ignore[index]
    assert by_type["input"].sum == 200 and by_type["output"].sum == 40  # type: ignore[attr-defined]
    assert by_type["input"].attributes["mesh.agent"] == "writer"  # type: ignore[index]
    assert "mesh.llm.cost" in metrics and "gen_ai.client.operation.duration" in metrics


async def test_offline_provider_through_the_router() -> None:
    router = Router([OfflineLLM()])
    assert await router.complete(system="s", prompt="Just this.") == "Just this."
