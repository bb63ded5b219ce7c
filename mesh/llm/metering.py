"""Token and cost accounting of model calls: OpenTelemetry metrics and span attributes with
the GenAI semantic-convention names, and running totals per agent and per conversation.

The scope of a call (tenant, agent, conversation) is set by the `llm_scope` middleware
around each handler, so agents never pass it by hand.
"""

from __future__ import annotations

import contextvars
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

from mesh.llm.types import Usage
from mesh.middleware.base import Call


@dataclass(frozen=True, slots=True)
class Scope:
    tenant: str = "default"
    agent: str = ""
    conversation: str = ""
    totals: Totals | None = None  # the handling's own (Context.usage): into its record entry


_NO_SCOPE = Scope()
_scope: contextvars.ContextVar[Scope | None] = contextvars.ContextVar("mesh_llm_scope", default=None)


def current_scope() -> Scope:
    return _scope.get() or _NO_SCOPE


def llm_scope(call_next: Call) -> Call:
    """Middleware: model calls made by this handler are counted for its agent and conversation."""

    async def call(ctx: Any, msg: Any) -> Any:
        settings = ctx.settings
        tenant = settings.tenant if settings is not None else "default"
        token = _scope.set(Scope(tenant, ctx.agent, ctx.conversation_id, getattr(ctx, "usage", None)))
        try:
            return await call_next(ctx, msg)
        finally:
            _scope.reset(token)

    return call


# USD per million tokens (input, output); unknown models cost 0 and are still counted
PRICES: dict[str, tuple[float, float]] = {
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-opus-4-1": (15.0, 75.0),
}


def cost_of(model: str, usage: Usage) -> float:
    price_in, price_out = next((p for m, p in PRICES.items() if model.startswith(m)), (0.0, 0.0))
    return (usage.input_tokens * price_in + usage.output_tokens * price_out) / 1e6


@dataclass(slots=True)
class Totals:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    replayed: int = 0  # answers given again from the journal: not paid, not in the counts above

    def add(self, usage: Usage, cost: float) -> None:
        self.calls += 1
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cost_usd += cost


@dataclass(slots=True)
class Ledger:
    """In-process running totals; conversations are kept for the most recent ``keep``."""

    keep: int = 1000
    agents: dict[str, Totals] = field(default_factory=dict)
    conversations: OrderedDict[str, Totals] = field(default_factory=OrderedDict)

    def add(self, scope: Scope, usage: Usage, cost: float) -> None:
        for totals in self._of(scope):
            totals.add(usage, cost)

    def replay(self, scope: Scope) -> None:
        for totals in self._of(scope):
            totals.replayed += 1

    def _of(self, scope: Scope) -> tuple[Totals, Totals]:
        """The totals of the scope's agent and conversation (the latter kept as most recent)."""
        conv = self.conversations.setdefault(scope.conversation, Totals())
        self.conversations.move_to_end(scope.conversation)
        while len(self.conversations) > self.keep:
            self.conversations.popitem(last=False)
        return self.agents.setdefault(scope.agent, Totals()), conv


class Metering:
    """Records each call as metrics, on its span, and in the ledger."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("mesh.llm")
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per model call"
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="Model call duration"
        )
        self.cost = meter.create_counter("mesh.llm.cost", unit="USD", description="Estimated model cost")
        self.calls = meter.create_counter(
            "mesh.llm.calls", unit="{call}", description="Model calls by outcome"
        )
        self.ledger = Ledger()

    def record(
        self,
        span: trace.Span,
        system: str,
        model: str,
        usage: Usage,
        seconds: float,
        response_model: str = "",
    ) -> None:
        scope = current_scope()
        cost = cost_of(response_model or model, usage)
        attrs = {
            "gen_ai.system": system,
            "gen_ai.request.model": model,
            "gen_ai.operation.name": "chat",
            "mesh.agent": scope.agent,
            "mesh.tenant": scope.tenant,
        }
        self.tokens.record(usage.input_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.tokens.record(usage.output_tokens, {**attrs, "gen_ai.token.type": "output"})
        self.duration.record(seconds, attrs)
        self.cost.add(cost, attrs)
        self.calls.add(1, {**attrs, "outcome": "ok"})
        self.ledger.add(scope, usage, cost)
        if scope.totals is not None:
            scope.totals.add(usage, cost)
        if span.is_recording():
            span.set_attributes(
                {
                    "gen_ai.response.model": response_model or model,
                    "gen_ai.usage.input_tokens": usage.input_tokens,
                    "gen_ai.usage.output_tokens": usage.output_tokens,
                    "mesh.llm.cost_usd": cost,
                    "mesh.conversation": scope.conversation,
                }
            )

    def replayed(self, provider: str, model: str) -> None:
        """A call answered from the journal (mesh.llm.journal): counted with outcome
        ``replayed``, no tokens, no cost."""
        scope = current_scope()
        self.calls.add(
            1,
            {
                "gen_ai.request.model": model,
                "gen_ai.operation.name": "chat",
                "mesh.llm.provider": provider,
                "mesh.agent": scope.agent,
                "mesh.tenant": scope.tenant,
                "outcome": "replayed",
            },
        )
        self.ledger.replay(scope)

    def failed(self, system: str, model: str, kind: str) -> None:
        scope = current_scope()
        self.calls.add(
            1,
            {
                "gen_ai.system": system,
                "gen_ai.request.model": model,
                "gen_ai.operation.name": "chat",
                "mesh.agent": scope.agent,
                "mesh.tenant": scope.tenant,
                "outcome": kind,
            },
        )
