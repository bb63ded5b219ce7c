"""The router: ordered fallback between providers, retries with exponential backoff and
jitter on retryable errors, a circuit breaker per provider, per-tenant and per-agent limits,
and the accounting of every call. It speaks the same `LLM` interface as a provider."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh.llm.limits import CircuitBreaker, Limits
from mesh.llm.metering import Metering, current_scope
from mesh.llm.types import Base, LLMError, LLMUnavailable, Provider, Reply, Request, StreamEvent

Sleep = Callable[[float], Awaitable[None]]


def backoff(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Full jitter: a random delay up to ``base * 2**attempt`` (at most ``cap``)."""
    return float(rng() * min(cap, base * (2**attempt)))


class Router(Base):
    def __init__(
        self,
        providers: Sequence[Provider],
        *,
        retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        timeout: float = 60.0,
        breaker: Callable[[], CircuitBreaker] = CircuitBreaker,
        limits: Limits | None = None,
        metering: Metering | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        tracer: trace.Tracer | None = None,
    ) -> None:
        if not providers:
            raise ValueError("a router needs at least one provider")
        self.providers = list(providers)
        self.name = self.providers[0].name
        self.retries = retries
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.timeout = timeout
        self.breakers = {p.name: breaker() for p in self.providers}
        self.limits = limits
        self.metering = metering or Metering()
        self._sleep, self._rng = sleep, rng
        self._tracer = tracer or trace.get_tracer("mesh.llm")

    async def chat(self, request: Request) -> Reply:
        scope = current_scope()
        if self.limits is None:
            return await self._chat(request)
        async with self.limits.hold(scope.tenant, scope.agent):
            return await self._chat(request)

    async def _chat(self, request: Request) -> Reply:
        errors: list[str] = []
        for provider in self.providers:
            breaker = self.breakers[provider.name]
            for attempt in range(self.retries + 1):
                if not breaker.allow():
                    errors.append(f"{provider.name}: circuit open")
                    self.metering.failed(provider.system, provider.model, "circuit_open")
                    break
                try:
                    with self._span(provider, request) as span:
                        started = time.perf_counter()
                        reply = await self._call(provider, request, span)
                        self.metering.record(
                            span,
                            provider.system,
                            provider.model,
                            reply.usage,
                            time.perf_counter() - started,
                            reply.model,
                        )
                    breaker.success()
                    return reply
                except LLMError as exc:
                    breaker.failure() if exc.retryable else breaker.success()
                    errors.append(str(exc))
                    self.metering.failed(provider.system, provider.model, _kind(exc))
                    if not exc.retryable:
                        break  # the same request would fail again here: try the next provider
                    if attempt < self.retries:
                        await self._sleep(backoff(attempt, self.backoff_base, self.backoff_max, self._rng))
        raise LLMUnavailable(errors)

    async def _call(self, provider: Provider, request: Request, span: trace.Span) -> Reply:
        try:
            async with asyncio.timeout(self.timeout):
                return await provider.chat(request)
        except TimeoutError as exc:
            raise LLMError(f"{provider.name}: no answer within {self.timeout:g}s", retryable=True) from exc

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        """Stream from the first provider that starts answering. Fallback and retries happen
        only before the first delta: a stream that breaks midway raises `LLMError`."""
        scope = current_scope()
        if self.limits is None:
            async for event in self._stream(request):
                yield event
            return
        async with self.limits.hold(scope.tenant, scope.agent):
            async for event in self._stream(request):
                yield event

    async def _stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        errors: list[str] = []
        for provider in self.providers:
            breaker = self.breakers[provider.name]
            for attempt in range(self.retries + 1):
                if not breaker.allow():
                    errors.append(f"{provider.name}: circuit open")
                    break
                started_output = False
                try:
                    with self._span(provider, request, streaming=True) as span:
                        began = time.perf_counter()
                        events = provider.stream(request)
                        while True:
                            try:
                                async with asyncio.timeout(self.timeout):
                                    event = await anext(events)
                            except StopAsyncIteration:
                                break
                            except TimeoutError as exc:
                                raise LLMError(
                                    f"{provider.name}: stream stalled for {self.timeout:g}s", retryable=True
                                ) from exc
                            if isinstance(event, Reply):
                                self.metering.record(
                                    span,
                                    provider.system,
                                    provider.model,
                                    event.usage,
                                    time.perf_counter() - began,
                                    event.model,
                                )
                            started_output = True
                            yield event
                    breaker.success()
                    return
                except LLMError as exc:
                    breaker.failure() if exc.retryable else breaker.success()
                    errors.append(str(exc))
                    self.metering.failed(provider.system, provider.model, _kind(exc))
                    if started_output:
                        raise
                    if not exc.retryable:
                        break
                    if attempt < self.retries:
                        await self._sleep(backoff(attempt, self.backoff_base, self.backoff_max, self._rng))
        raise LLMUnavailable(errors)

    def _span(self, provider: Provider, request: Request, streaming: bool = False) -> _Current:
        span = self._tracer.start_span(
            f"chat {provider.model}",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.system": provider.system,
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": provider.model,
                "gen_ai.request.max_tokens": request.max_tokens,
                "mesh.llm.provider": provider.name,
                "mesh.llm.streaming": streaming,
            },
        )
        return _Current(span)


class _Current:
    """Use a started span as the current one, ending it with an error status on failure."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._cm = trace.use_span(span, end_on_exit=True, record_exception=True, set_status_on_exception=True)

    def __enter__(self) -> trace.Span:
        self._cm.__enter__()
        return self.span

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.span.set_status(Status(StatusCode.OK))
        self._cm.__exit__(*exc)  # type: ignore[arg-type]


def _kind(exc: LLMError) -> str:
    if exc.status == 429:
        return "rate_limited"
    if exc.status in (529, 503):
        return "overloaded"
    if exc.status is not None:
        return f"http_{exc.status}"
    return "timeout" if "timed out" in str(exc) or "within" in str(exc) else "error"
