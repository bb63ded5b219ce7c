"""Budgets: how many tokens and how many (estimated) dollars a conversation, and a tenant in a
UTC day, may spend on model calls, counted across every agent and replica of the mesh.

The counts are JSON values in the ``MESH_STATE`` bucket, one key per budget:

    budget.conv.<conversation key>           the conversation's total
    budget.tenant.<tenant key>.<YYYYMMDD>    the tenant's total of that UTC day

(keys as `mesh.transport.streams.id_key` makes them). ``MESH_STATE`` keeps a key 7 days after
its last write: a conversation idle that long starts again from zero, and a tenant's days go
away on their own. No bucket of its own: no new bucket to provision on an existing mesh, and
the order of `bucket_specs` is left alone.

`Budgeted` wraps an agent's model (inside `Journaled`: an answer given again from the
journal is free and never refused). Before a call it reads the counts and raises
`BudgetExceeded` if one is spent; after the call it adds the call's tokens and cost with
compare-and-set, read again and retried on conflict, so replicas adding at once lose
nothing. A call is checked before its cost is known: a budget may end past its limit by what
the calls that passed the check while it was not yet spent cost, one call for a
conversation whose calls are made one after another.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
import structlog

from mesh.llm.metering import Scope, cost_of, current_scope
from mesh.llm.types import LLM, Base, Reply, Request, StreamEvent
from mesh.transport import streams
from mesh.transport.streams import id_key
from mesh.wire.errors import BudgetExceeded

if TYPE_CHECKING:
    from mesh.llm.metering import Metering
    from mesh.transport.base import Transport
    from mesh.transport.state import StateStore
    from mesh.wire.settings import Settings

log = structlog.get_logger("mesh.llm.budget")
CAS_ATTEMPTS = 100  # conflicts in a row before an addition is given up (and logged)


class Spent(msgspec.Struct, frozen=True, kw_only=True):
    """What a budget has spent so far."""

    tokens: int = 0
    usd: float = 0.0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Spent).decode


def conversation_key(conversation: str) -> str:
    return f"budget.conv.{id_key(conversation)}"


def tenant_key(tenant: str, at: float | None = None) -> str:
    day = time.strftime("%Y%m%d", time.gmtime(time.time() if at is None else at))
    return f"budget.tenant.{id_key(tenant)}.{day}"


@dataclass(frozen=True, slots=True)
class Limit:
    """One budget: where it is counted, its limits (0: none) and what to call it in an error."""

    key: str
    tokens: int
    usd: float
    what: str

    def spent_by(self, spent: Spent) -> str:
        """Why `spent` has used this budget up, or "" while it has not."""
        if self.tokens and spent.tokens >= self.tokens:
            return f"{spent.tokens} tokens of {self.tokens}"
        if self.usd and spent.usd >= self.usd:
            return f"${spent.usd:.4f} of ${self.usd:g}"
        return ""


async def add(store: StateStore, key: str, tokens: int, usd: float) -> Spent:
    """Add to the count under `key` with compare-and-set: read, add, write if nobody wrote
    since the read; else read again. What it returns is the count it wrote."""
    for attempt in range(CAS_ATTEMPTS):
        got = await store.get(key)
        if got is None:
            spent = Spent(tokens=tokens, usd=usd)
            if await store.create(key, _encode(spent)) is not None:
                return spent
        else:
            was = _decode(got[0])
            spent = Spent(tokens=was.tokens + tokens, usd=was.usd + usd)
            if await store.update(key, _encode(spent), got[1]) is not None:
                return spent
        await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 10)))  # let the other finish
    raise RuntimeError(f"budget {key}: {CAS_ATTEMPTS} conflicting updates in a row")


class Budget:
    """The budgets of one agent process, read from its settings; the ``MESH_STATE`` bucket is
    bound on first use. With every limit 0 it costs nothing: no read, no write."""

    def __init__(
        self, settings: Settings, transport: Transport | None = None, store: StateStore | None = None
    ):
        self.settings = settings
        self.transport = transport
        self.store = store
        self.on = any(
            (
                settings.budget_conversation_tokens,
                settings.budget_conversation_usd,
                settings.budget_tenant_tokens,
                settings.budget_tenant_usd,
            )
        )

    def limits(self, scope: Scope) -> list[Limit]:
        s, out = self.settings, []
        if scope.conversation and (s.budget_conversation_tokens or s.budget_conversation_usd):
            out.append(
                Limit(
                    conversation_key(scope.conversation),
                    s.budget_conversation_tokens,
                    s.budget_conversation_usd,
                    f"conversation {scope.conversation!r}",
                )
            )
        if s.budget_tenant_tokens or s.budget_tenant_usd:
            what = f"tenant {scope.tenant!r} today (UTC)"
            out.append(Limit(tenant_key(scope.tenant), s.budget_tenant_tokens, s.budget_tenant_usd, what))
        return out

    async def _store(self) -> StateStore | None:
        if self.store is None and self.transport is not None:
            _, spec, *_ = streams.bucket_specs(self.settings)
            self.store = await self.transport.state(spec, self.settings)
        return self.store

    async def check(self, scope: Scope) -> None:
        """Raise `BudgetExceeded` if a budget of `scope` is spent. Outside a handling (no
        agent in the scope) nothing is checked. A bucket that cannot be read lets the call
        through, said in the log: budgets guard against runaway spending, and stopping every
        model call while the bucket is away would be an outage of its own."""
        if not self.on or not scope.agent:
            return
        try:
            store = await self._store()
            found = [(limit, await store.get(limit.key)) for limit in self.limits(scope)] if store else []
        except Exception as exc:
            log.warning("budgets not readable: calling the model", agent=scope.agent, error=repr(exc))
            return
        for limit, got in found:
            why = limit.spent_by(_decode(got[0])) if got is not None else ""
            if why:
                raise BudgetExceeded(
                    f"the model budget of {limit.what} is spent ({why} used; MESH_BUDGET_*): "
                    "no more model calls there"
                )

    async def charge(self, scope: Scope, reply: Reply) -> None:
        """Add the call that gave `reply` to every budget of `scope`."""
        if not self.on or not scope.agent:
            return
        tokens = reply.usage.input_tokens + reply.usage.output_tokens
        usd = cost_of(reply.model, reply.usage)
        for limit in self.limits(scope):
            try:
                store = await self._store()
                if store is not None:
                    await add(store, limit.key, tokens, usd)
            except Exception as exc:
                log.error("model call not counted in its budget", key=limit.key, error=repr(exc))


class Budgeted(Base):
    """A model whose calls are checked against, and counted in, the budgets of the handling
    that makes them (`mesh.llm.metering.current_scope`)."""

    def __init__(self, inner: LLM, budget: Budget) -> None:
        self.inner = inner
        self.name = inner.name
        self.budget = budget
        self.metering: Metering | None = getattr(inner, "metering", None)  # for `journaled`

    async def chat(self, request: Request) -> Reply:
        scope = current_scope()
        await self.budget.check(scope)
        reply = await self.inner.chat(request)
        await self.budget.charge(scope, reply)
        return reply

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        scope = current_scope()
        await self.budget.check(scope)
        async for event in self.inner.stream(request):
            if isinstance(event, Reply):
                await self.budget.charge(scope, event)
            yield event


def budgeted(model: LLM, settings: Settings, transport: Transport | None = None) -> LLM:
    """`model` under the budgets of `settings`; `model` itself when there are none."""
    budget = Budget(settings, transport)
    return Budgeted(model, budget) if budget.on else model
