"""The memory service: an agent that owns the Qdrant collection and answers typed requests.

    mesh run mesh.services.memory:agent

Every request gets its answer type or `MemoryFailed` (a typed error): bad input never
crashes the service and never leaves a requester waiting. The tenant and namespaces a
request may reach come from who sent it (`mesh.memory.scopes`), never from its body, and the
provenance of a write names that sender. `mesh run` opens the
collection at start (from this process's settings); a background task sweeps expired memories and
lets the embedded engine build its index. With a Qdrant server behind it, run as many
replicas as you like; the embedded engine is one process per data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

import structlog
from opentelemetry import metrics, trace

from mesh.agent.context import Context
from mesh.agent.declaration import Agent
from mesh.llm import LLM
from mesh.memory.backend import Found
from mesh.memory.entities import EntityGraph
from mesh.memory.messages import (
    AddTurn,
    EntityStored,
    Forget,
    Forgotten,
    GetHistory,
    GetNeighbourhood,
    History,
    MemoryFailed,
    MemoryHit,
    Neighbourhood,
    Provenance,
    Recall,
    Recalled,
    Remember,
    Remembered,
    Turn,
    UpsertEntity,
)
from mesh.memory.scopes import Scope, Scopes
from mesh.memory.store import MemoryStore, Origin
from mesh.memory.working import Window, WorkingMemory
from mesh.transport.keys import KeyDirectory, known_directory
from mesh.wire.errors import MemoryRefused
from mesh.wire.senders import sender_of
from mesh.wire.settings import Settings

_tracer = trace.get_tracer("mesh.memory")


class MemoryMeters:
    """Metrics of the service's operations (docs/operations.md#metrics): each one by kind
    (``mesh.memory.operation``: remember, recall...) and outcome (ok, or the failure's kind)."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("mesh.memory")
        self.operations = meter.create_counter(
            "mesh.memory.operations", unit="{operation}", description="Memory operations by kind and outcome"
        )
        self.duration = meter.create_histogram(
            "mesh.memory.duration", unit="s", description="Memory operation time"
        )

    def record(self, op: str, outcome: str, seconds: float) -> None:
        self.operations.add(1, {"mesh.memory.operation": op, "outcome": outcome})
        self.duration.record(seconds, {"mesh.memory.operation": op})


_meters = MemoryMeters()  # through the global provider, whenever it is installed

log = structlog.get_logger("mesh.memory")

T = TypeVar("T")


class MemoryService:
    """Holds the store (opened once, on first use) and the background sweeper."""

    def __init__(
        self,
        open_store: Callable[[], Awaitable[MemoryStore]],
        *,
        budget: int = 1024,
        sweep_every: float = 60.0,
        scopes: Scopes | None = None,
        directory: KeyDirectory | None = None,
    ) -> None:
        self._open_store = open_store
        self.scopes = scopes or Scopes({})
        # the identities, with each agent's declared memory scopes: given, or found from the
        # settings of the first request's context (a mesh with identities)
        self.directory = directory
        self._looked_up = directory is not None
        self._store: MemoryStore | None = None
        self._opening = asyncio.Lock()
        self._working: WorkingMemory | None = None
        self.budget = budget
        self.sweep_every = sweep_every
        self._sweeper: asyncio.Task[None] | None = None

    def scope_of(self, caller: str, settings: Settings | None) -> Scope:
        """The operator's scope for `caller`, narrowed to the memory scopes it declares if it
        is an agent of a mesh with identities (`settings`: where to find them, once)."""
        scope = self.scopes.of(caller)
        if not self._looked_up and settings is not None:
            self._looked_up = True
            self.directory = known_directory(settings)
        if self.directory is not None and self.directory.is_agent(caller):
            declared = self.directory.memory_scopes(caller)
            if declared is not None:
                scope = replace(scope, declared=declared)
        return scope

    async def store(self, llm: LLM) -> MemoryStore:
        if self._store is None:
            async with self._opening:
                if self._store is None:
                    store = await self._open_store()
                    self._working = WorkingMemory(store, llm, self.budget)
                    self._sweeper = asyncio.create_task(self._sweep_forever(store))
                    self._store = store
        return self._store

    async def working(self, llm: LLM) -> WorkingMemory:
        await self.store(llm)
        assert self._working is not None
        return self._working

    async def _sweep_forever(self, store: MemoryStore) -> None:
        while True:
            await asyncio.sleep(self.sweep_every)
            try:
                swept = await store.sweep()
                await store.run(store.backend.maintain)
                if swept:
                    log.info("expired memories deleted", count=swept)
            except Exception:
                log.exception("memory sweep failed")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._store is not None:
            await self._store.close()
            self._store = None


def origin_of(ctx: Context) -> Origin:
    env = ctx.envelope
    return Origin(
        agent=sender_of(env),
        message_id=env.causation or env.id,
        trace_id=ctx.trace_id,
        conversation=env.conversation,
    )


def hit(found: Found) -> MemoryHit:
    p = found.payload
    sources = [Provenance(**s) for s in p.get("sources") or []]
    first = Provenance(
        agent=p.get("agent", ""),
        message_id=p.get("message_id", ""),
        trace_id=p.get("trace_id", ""),
        conversation=p.get("conversation", ""),
        at=float(p.get("at", 0.0)),
    )
    expires = float(p.get("expires_at", 0.0))
    return MemoryHit(
        id=found.id,
        text=str(p.get("text", "")),
        score=found.score,
        kind=str(p.get("kind", "")),
        namespace=str(p.get("namespace", "")),
        provenance=first,
        seen=int(p.get("seen", 1)),
        sources=sources,
        expires_at=expires if expires < 1e14 else None,
        meta=dict(p.get("meta") or {}),
    )


def history(window: Window) -> History:
    turns = [
        Turn(
            role=str(t.get("role", "")), text=str(t["text"]), agent=str(t.get("agent", "")), at=float(t["at"])
        )
        for t in window.turns
    ]
    return History(
        conversation=window.conversation,
        summary=window.summary,
        turns=turns,
        tokens=window.tokens,
        compressed=window.compressed,
    )


def _caller(service: MemoryService, ctx: Context) -> tuple[str, Scope]:
    """Who sent the request, and the tenant and namespaces that identity may reach: the
    operator's entry for it (MESH_MEMORY_SCOPES), narrowed to what the agent declares."""
    caller = sender_of(ctx.envelope)
    return caller, service.scope_of(caller, ctx.settings)


async def _answer(
    op: str, ctx: Context, work: Callable[[], Awaitable[T]], namespace: str = ""
) -> T | MemoryFailed:
    """Run one operation in its own span; any failure becomes a typed `MemoryFailed`. Each
    one, done or refused, is appended to the audit trail with the caller's identity."""
    with _tracer.start_as_current_span(f"memory {op}") as span:
        started = time.perf_counter()
        try:
            answer: T | MemoryFailed = await work()
        except MemoryRefused as exc:
            span.set_attribute("mesh.memory.refused", exc.kind)
            answer = MemoryFailed(kind=exc.kind, reason=exc.reason)
        except Exception as exc:
            ctx.log.exception("memory operation failed", op=op)
            span.record_exception(exc)
            answer = MemoryFailed(kind="internal", reason=f"{op} failed: {type(exc).__name__}: {exc}")
        status = answer.kind if isinstance(answer, MemoryFailed) else "ok"
        _meters.record(op, status, time.perf_counter() - started)
        if ctx.audit is not None:
            await ctx.audit.append(
                f"memory.{op}",
                actor=sender_of(ctx.envelope),
                trace_id=ctx.trace_id,
                conversation=ctx.conversation_id,
                detail={"namespace": namespace, "status": status},
            )
        return answer


def memory_agent(service: MemoryService, name: str = "memory") -> Agent:
    """The memory service's agent, answering over its direct line."""
    agent = Agent(name, description="Shared semantic memory on Qdrant (remember, recall, forget, entities)")

    @agent.handler(events=False)
    async def remember(msg: Remember, ctx: Context) -> Remembered | MemoryFailed:
        async def work() -> Remembered:
            store = await service.store(ctx.llm)
            caller, scope = _caller(service, ctx)
            done = await store.remember(
                msg.text,
                tenant=scope.tenant,
                origin=origin_of(ctx),
                kind=msg.kind,
                namespace=scope.check(caller, msg.namespace),
                ttl=msg.ttl,
                meta=msg.meta,
                vector=msg.vector,
            )
            return Remembered(id=done.id, merged=done.merged, seen=done.seen)

        return await _answer("remember", ctx, work, msg.namespace)

    @agent.handler(events=False)
    async def recall(msg: Recall, ctx: Context) -> Recalled | MemoryFailed:
        async def work() -> Recalled:
            store = await service.store(ctx.llm)
            caller, scope = _caller(service, ctx)
            found, mode = await store.recall(
                msg.query,
                tenant=scope.tenant,
                k=msg.k,
                namespace=scope.check(caller, msg.namespace),
                where=msg.where,
                mode=msg.mode,
                vector=msg.vector,
            )
            trace.get_current_span().set_attribute("mesh.memory.hits", len(found))
            return Recalled(hits=[hit(f) for f in found], mode=mode)

        return await _answer("recall", ctx, work, msg.namespace)

    @agent.handler(events=False)
    async def forget(msg: Forget, ctx: Context) -> Forgotten | MemoryFailed:
        async def work() -> Forgotten:
            store = await service.store(ctx.llm)
            caller, scope = _caller(service, ctx)
            namespace = scope.check(caller, msg.namespace)
            count = await store.forget(tenant=scope.tenant, namespace=namespace, ids=msg.ids, where=msg.where)
            return Forgotten(count=count)

        return await _answer("forget", ctx, work, msg.namespace)

    @agent.handler(events=False)
    async def upsert_entity(msg: UpsertEntity, ctx: Context) -> EntityStored | MemoryFailed:
        async def work() -> EntityStored:
            store = await service.store(ctx.llm)
            caller, scope = _caller(service, ctx)
            entity, created = await EntityGraph(store).upsert(
                msg.id,
                tenant=scope.tenant,
                origin=origin_of(ctx),
                namespace=scope.check(caller, msg.namespace),
                type=msg.type,
                attributes=msg.attributes,
                relations=msg.relations,
                unrelate=msg.unrelate,
            )
            return EntityStored(entity=entity, created=created)

        return await _answer("upsert_entity", ctx, work, msg.namespace)

    @agent.handler(events=False)
    async def neighbourhood(msg: GetNeighbourhood, ctx: Context) -> Neighbourhood | MemoryFailed:
        async def work() -> Neighbourhood:
            store = await service.store(ctx.llm)
            caller, scope = _caller(service, ctx)
            found = await EntityGraph(store).neighbourhood(
                msg.id,
                tenant=scope.tenant,
                namespace=scope.check(caller, msg.namespace),
                depth=msg.depth,
                direction=msg.direction,
                limit=msg.limit,
            )
            trace.get_current_span().set_attribute("mesh.memory.entities", len(found.entities))
            return found

        return await _answer("neighbourhood", ctx, work, msg.namespace)

    @agent.handler(events=False)
    async def add_turn(msg: AddTurn, ctx: Context) -> History | MemoryFailed:
        async def work() -> History:
            working = await service.working(ctx.llm)
            tenant = _caller(service, ctx)[1].tenant
            return history(await working.add(tenant, msg.role, msg.text, origin_of(ctx)))

        return await _answer("add_turn", ctx, work)

    @agent.handler(events=False)
    async def get_history(msg: GetHistory, ctx: Context) -> History | MemoryFailed:
        async def work() -> History:
            working = await service.working(ctx.llm)
            return history(await working.read(_caller(service, ctx)[1].tenant, ctx.conversation_id))

        return await _answer("get_history", ctx, work)

    return agent


def __getattr__(name: str) -> Agent:
    """`mesh run mesh.services.memory:agent`: the service of this process's settings, its
    collection opened now, so a wrong embedder or an unreachable Qdrant fails at start."""
    if name != "agent":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    settings = Settings.load()
    store = MemoryStore.from_settings(settings)
    store.backend.open(store.spec)

    async def opened() -> MemoryStore:
        return store

    service = MemoryService(
        opened,
        budget=settings.memory_turn_budget,
        sweep_every=settings.memory_sweep,
        scopes=Scopes.parse(settings.memory_scopes),
    )
    built = memory_agent(service, settings.memory_agent)
    globals()["agent"] = built
    return built
