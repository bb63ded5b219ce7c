"""`ctx.memory`: the handler's view of shared memory, over the memory service's direct line.

    hits = await ctx.memory.recall("refund policy for duplicate charges", k=3)
    await ctx.memory.remember("Ada prefers email", kind="entity")
    await ctx.memory.forget(where={"conversation": ctx.conversation_id})
    await ctx.memory.entity("ada", type="person", relations=[("works_on", "apollo")])
    around = await ctx.memory.neighbourhood("ada", depth=2)

Each call is one typed request/reply. If the service does not answer within
MESH_MEMORY_TIMEOUT it raises `MemoryUnavailable`; bad input raises `MemoryRefused` with
the service's reason. Catch `MemoryFault` to carry on without memory, or let it raise to
have the message retried and then dead-lettered like any failing handler.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from mesh.memory.messages import (
    AddTurn,
    Entity,
    EntityStored,
    Forget,
    Forgotten,
    GetHistory,
    GetNeighbourhood,
    History,
    MemoryFailed,
    Neighbourhood,
    Recall,
    Recalled,
    Relation,
    Remember,
    Remembered,
    UpsertEntity,
)
from mesh.wire.errors import MemoryRefused, MemoryUnavailable, RequestError, RequestRefused
from mesh.wire.messages import Message
from mesh.wire.settings import Settings

R = TypeVar("R", bound=Message)


class Requester(Protocol):
    """What `Memory` needs: `Context.request` (or a function with its signature)."""

    async def request(
        self,
        agent: str,
        msg: Message,
        reply_type: type[R],
        *,
        timeout: float = ...,
        errors: tuple[type[Message], ...] = ...,
    ) -> R: ...


class Memory:
    """Remember, recall and forget in the tenant of this process's identity: the memory
    service decides it from who sends the request (its MESH_MEMORY_SCOPES), whatever the
    request says. `tenant` (MESH_MEMORY_TENANT) is still sent, for older services."""

    def __init__(self, requester: Requester, settings: Settings | None = None, *, tenant: str | None = None):
        s = settings or _defaults()
        self._requester = requester
        self.agent = s.memory_agent
        self.timeout = s.memory_timeout
        self.tenant = tenant or s.memory_tenant

    async def _ask(self, msg: Message, reply_type: type[R], timeout: float | None) -> R:

        wait = timeout or self.timeout
        try:
            return await self._requester.request(
                self.agent, msg, reply_type, timeout=wait, errors=(MemoryFailed,)
            )
        except RequestRefused as exc:
            failed: Any = exc.answer
            raise MemoryRefused(failed.kind, failed.reason) from None
        except RequestError as exc:
            raise MemoryUnavailable(f"memory service {self.agent!r}: {exc}") from None

    async def remember(
        self,
        text: str,
        *,
        kind: str = "fact",
        namespace: str = "default",
        ttl: float | None = None,
        meta: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Store `text`; returns `Remembered` (its id, and whether it merged into a near-duplicate)."""

        msg = Remember(
            text=text, kind=kind, tenant=self.tenant, namespace=namespace, ttl=ttl, meta=dict(meta or {})
        )
        return await self._ask(msg, Remembered, timeout)

    async def recall(
        self,
        query: str,
        *,
        k: int = 5,
        namespace: str = "default",
        where: Mapping[str, Any] | None = None,
        mode: str = "hybrid",
        timeout: float | None = None,
    ) -> list[Any]:
        """The `k` memories nearest to `query` (`MemoryHit`s, best first, with provenance)."""

        msg = Recall(
            query=query, k=k, tenant=self.tenant, namespace=namespace, where=dict(where or {}), mode=mode
        )
        answer: Any = await self._ask(msg, Recalled, timeout)
        return list(answer.hits)

    async def forget(
        self,
        *,
        ids: Sequence[str] = (),
        where: Mapping[str, Any] | None = None,
        namespace: str = "default",
        timeout: float | None = None,
    ) -> int:
        """Delete memories by id and/or filter; how many were deleted."""

        msg = Forget(tenant=self.tenant, namespace=namespace, ids=list(ids), where=dict(where or {}))
        answer: Any = await self._ask(msg, Forgotten, timeout)
        return int(answer.count)

    async def entity(
        self,
        id: str,
        *,
        type: str = "",
        attributes: Mapping[str, Any] | None = None,
        relations: Iterable[Relation | tuple[str, str]] = (),
        unrelate: Iterable[Relation | tuple[str, str]] = (),
        namespace: str = "default",
        timeout: float | None = None,
    ) -> Entity:
        """Create entity `id` or merge into it: attributes overwrite key by key (None removes
        one), `relations` (``(name, target id)`` pairs) are added, `unrelate` removed. `type`
        is needed for a new entity; left empty, the stored type stays. Returns the entity."""

        msg = UpsertEntity(
            id=id,
            type=type,
            namespace=namespace,
            attributes=dict(attributes or {}),
            relations=_relations(relations),
            unrelate=_relations(unrelate),
        )
        return (await self._ask(msg, EntityStored, timeout)).entity

    async def neighbourhood(
        self,
        id: str,
        *,
        depth: int = 1,
        direction: str = "both",
        limit: int = 50,
        namespace: str = "default",
        timeout: float | None = None,
    ) -> Neighbourhood:
        """Entity `id` and the entities within `depth` relations of it (0-3; ``both``
        directions or ``out`` only), at most `limit` (1-200), with the relations among them."""

        msg = GetNeighbourhood(id=id, depth=depth, direction=direction, limit=limit, namespace=namespace)
        return await self._ask(msg, Neighbourhood, timeout)

    async def add_turn(self, role: str, text: str, *, timeout: float | None = None) -> Any:
        """Append a turn to this conversation's working memory; returns its `History`."""

        return await self._ask(AddTurn(role=role, text=text, tenant=self.tenant), History, timeout)

    async def history(self, *, timeout: float | None = None) -> Any:
        """This conversation's working memory: summary of older turns, then recent turns."""

        return await self._ask(GetHistory(tenant=self.tenant), History, timeout)


def _relations(pairs: Iterable[Relation | tuple[str, str]]) -> list[Relation]:
    return [p if isinstance(p, Relation) else Relation(name=p[0], to=p[1]) for p in pairs]


_DEFAULTS: Settings | None = None


def _defaults() -> Settings:
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = Settings.load(environ={})
    return _DEFAULTS
