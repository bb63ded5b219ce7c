"""Shared-memory messages: what agents ask the memory service, and what it answers.

Every request is answered on the requester's reply subject with the matching answer
type, or with `MemoryFailed` (a typed error) when the input cannot be stored or run.
Filters (`where`) are plain JSON objects so that a malformed one is answered with
`MemoryFailed(kind="bad_filter")` instead of failing to decode; their keys are
``agent``, ``conversation``, ``kind`` (each a string or a list of strings), ``after``
and ``before`` (Unix seconds, on the time the memory was written).

The ``tenant`` fields are kept for older clients and ignored: the service takes the tenant
from the identity that sent the request (`mesh.memory.scopes`).
"""

from __future__ import annotations

from typing import Any

import msgspec

from mesh.wire.messages import Message, message


class Provenance(msgspec.Struct, frozen=True, kw_only=True):
    """Where a memory came from: the writing agent, the message and trace that caused the
    write, its conversation and the time (Unix seconds)."""

    agent: str
    message_id: str
    trace_id: str
    conversation: str
    at: float


class MemoryHit(msgspec.Struct, frozen=True, kw_only=True):
    """One recalled memory with its score and provenance."""

    id: str
    text: str
    score: float
    kind: str
    namespace: str
    provenance: Provenance  # the first write
    seen: int = 1  # writes merged into this memory (near-duplicates)
    sources: list[Provenance] = []  # the latest merged writes, newest last
    expires_at: float | None = None
    meta: dict[str, str] = {}


class Turn(msgspec.Struct, frozen=True, kw_only=True):
    """One turn of a conversation's working memory."""

    role: str
    text: str
    agent: str = ""
    at: float = 0.0


@message("memory.remember", version=1)
class Remember(Message, frozen=True):
    """Store `text` as a memory of `kind` (``fact``, ``episode``, ``entity``...)."""

    text: str
    kind: str = "fact"
    tenant: str = "default"  # ignored: the tenant is the caller's (mesh.memory.scopes)
    namespace: str = "default"
    ttl: float | None = None  # seconds; None keeps it until forgotten
    meta: dict[str, str] = {}
    vector: list[float] | None = None  # precomputed with the service's embedder (rare)


@message("memory.remembered", version=1)
class Remembered(Message, frozen=True):
    id: str
    merged: bool = False  # a near-duplicate was there: this write was merged into it
    seen: int = 1


@message("memory.recall", version=1)
class Recall(Message, frozen=True):
    """Find the `k` memories closest to `query` in the tenant and namespace."""

    query: str
    k: int = 5
    tenant: str = "default"  # ignored: the tenant is the caller's (mesh.memory.scopes)
    namespace: str = "default"
    where: dict[str, Any] = {}
    mode: str = "hybrid"  # hybrid | dense | keyword
    vector: list[float] | None = None


@message("memory.recalled", version=1)
class Recalled(Message, frozen=True):
    hits: list[MemoryHit]
    mode: str = "hybrid"  # what actually ran


@message("memory.forget", version=1)
class Forget(Message, frozen=True):
    """Delete memories by id and/or filter (an empty request forgets nothing)."""

    tenant: str = "default"  # ignored: the tenant is the caller's (mesh.memory.scopes)
    namespace: str = "default"
    ids: list[str] = []
    where: dict[str, Any] = {}


@message("memory.forgotten", version=1)
class Forgotten(Message, frozen=True):
    count: int


@message("memory.add_turn", version=1)
class AddTurn(Message, frozen=True):
    """Append a turn to a conversation's working memory (the request's conversation)."""

    role: str
    text: str
    tenant: str = "default"  # ignored: the tenant is the caller's (mesh.memory.scopes)


@message("memory.get_history", version=1)
class GetHistory(Message, frozen=True):
    tenant: str = "default"  # ignored: the tenant is the caller's (mesh.memory.scopes)


@message("memory.history", version=1)
class History(Message, frozen=True):
    """A conversation's working memory: a summary of older turns and the recent ones,
    within the service's token budget."""

    conversation: str
    summary: str
    turns: list[Turn]
    tokens: int
    compressed: int = 0  # turns folded into the summary so far


class Relation(msgspec.Struct, frozen=True, kw_only=True):
    """A typed relation from an entity to another of the same tenant and namespace:
    ``Relation(name="works_on", to="apollo")``."""

    name: str
    to: str


class Entity(msgspec.Struct, frozen=True, kw_only=True):
    """A stored entity: its id, type, attributes and outgoing relations, with provenance.
    In a `Neighbourhood`, `depth` is its distance from the entity asked about."""

    id: str
    type: str
    namespace: str
    attributes: dict[str, Any] = {}
    relations: list[Relation] = []
    provenance: Provenance | None = None  # the first write
    updated_at: float = 0.0
    seen: int = 1  # upserts merged into it
    depth: int = 0


class Edge(msgspec.Struct, frozen=True, kw_only=True):
    """A relation between two entities of a neighbourhood, in the direction it was stored."""

    source: str
    name: str
    target: str


@message("memory.upsert_entity", version=1)
class UpsertEntity(Message, frozen=True):
    """Create entity `id`, or merge into it: attributes are overwritten key by key (a null
    value removes the key), `relations` are added, `unrelate` removed. `type` may be left
    empty to keep the stored one; a new entity needs one."""

    id: str
    type: str = ""
    namespace: str = "default"
    attributes: dict[str, Any] = {}
    relations: list[Relation] = []
    unrelate: list[Relation] = []


@message("memory.entity", version=1)
class EntityStored(Message, frozen=True):
    entity: Entity
    created: bool = False  # False: merged into an existing entity


@message("memory.get_neighbourhood", version=1)
class GetNeighbourhood(Message, frozen=True):
    """Entity `id` and the entities within `depth` relations of it (0-3), at most `limit`
    entities (1-200). `direction` is ``both`` (relations followed either way) or ``out``."""

    id: str
    depth: int = 1
    namespace: str = "default"
    direction: str = "both"
    limit: int = 50


@message("memory.neighbourhood", version=1)
class Neighbourhood(Message, frozen=True):
    """The entities reached (the root first, then by depth) and the relations among them.
    `truncated`: the limit cut the answer (there is more within `depth`). An unknown root is
    an empty neighbourhood."""

    root: str
    entities: list[Entity]
    edges: list[Edge]
    truncated: bool = False


@message("memory.failed", version=1)
class MemoryFailed(Message, frozen=True):
    """The typed error answer: `kind` is ``oversize``, ``dimension``, ``unknown_tenant``,
    ``not_allowed`` (a namespace outside the caller's scopes), ``bad_filter``, ``invalid`` or
    ``internal``; `reason` says what and how to fix it."""

    kind: str
    reason: str
