"""The storage seam of shared memory: a `MemoryBackend` Protocol and the plain values it
takes, so the memory store never sees a Qdrant type.

Two implementations, both real Qdrant: `EdgeBackend` (the engine embedded in the memory
service process) and `QdrantBackend` (`qdrant-client`: a server, or its local mode).
Backends are synchronous; the store calls them from a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh.memory.embedding import Sparse
from mesh.wire.errors import ConfigError

DENSE = "dense"
SPARSE = "bm25"

# payload fields with an index: keyword fields first, then float fields
# (`targets`: the ids an entity's relations point to, for following relations backwards)
KEYWORD_FIELDS = ("tenant", "namespace", "kind", "agent", "conversation", "message_id", "targets")
FLOAT_FIELDS = ("at", "expires_at")


@dataclass(frozen=True, slots=True)
class CollectionSpec:
    """What a collection was made for. Stored with it; a mismatch at open is an error."""

    name: str
    embedder: str
    dim: int
    keywords: str  # the sparse encoder's name

    def to_json(self) -> dict[str, Any]:
        return {"embedder": self.embedder, "dim": self.dim, "keywords": self.keywords}

    def check(self, stored: dict[str, Any] | None, where: str) -> None:
        """Raise a ConfigError if `stored` (what the collection was made with) differs."""
        if not stored:
            return
        if stored.get("embedder") != self.embedder or stored.get("dim") != self.dim:
            raise ConfigError(
                f"memory collection {self.name!r} ({where}) was built with embedder "
                f"{stored.get('embedder')!r} (dim {stored.get('dim')}), but this service uses "
                f"{self.embedder!r} (dim {self.dim}). Set MESH_MEMORY_EMBEDDER/MESH_MEMORY_DIM to "
                f"match, or use another MESH_QDRANT_COLLECTION / data dir; mixing them would "
                f"return garbage."
            )
        if stored.get("keywords", self.keywords) != self.keywords:
            raise ConfigError(
                f"memory collection {self.name!r} ({where}) indexes keywords with "
                f"{stored.get('keywords')!r}, not {self.keywords!r}"
            )

    @staticmethod
    def parse(text: str) -> dict[str, Any]:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class Where:
    """A backend-neutral filter. `tenant` is required: no query crosses tenants."""

    tenant: str
    namespace: str | None = None
    kinds: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()
    conversations: tuple[str, ...] = ()
    after: float | None = None  # written at or after
    before: float | None = None  # written before
    alive_at: float | None = None  # not expired at this time
    ids: tuple[str, ...] = ()  # one of these point ids
    targets: tuple[str, ...] = ()  # an entity with a relation to one of these entity ids

    def __post_init__(self) -> None:
        if not self.tenant:
            raise ValueError("a memory filter needs a tenant")

    def keywords(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each keyword field and the values it may take (one at least)."""
        fields: list[tuple[str, tuple[str, ...]]] = [("tenant", (self.tenant,))]
        if self.namespace is not None:
            fields.append(("namespace", (self.namespace,)))
        for name, values in (
            ("kind", self.kinds),
            ("agent", self.agents),
            ("conversation", self.conversations),
            ("targets", self.targets),
        ):
            if values:
                fields.append((name, values))
        return fields


@dataclass(frozen=True, slots=True)
class StoredPoint:
    id: str
    dense: list[float]
    sparse: Sparse | None
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Found:
    id: str
    score: float
    payload: dict[str, Any] = field(default_factory=dict)


class MemoryBackend(Protocol):
    """A Qdrant collection of memories: dense + sparse vectors, payload, indexes."""

    name: str
    hybrid: bool  # dense + sparse fusion in one query

    def open(self, spec: CollectionSpec) -> None:
        """Create the collection and its payload indexes if absent; check `spec` against
        the one stored with it (ConfigError on mismatch)."""
        ...

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        """Write points; durable (survives a process restart) when this returns."""
        ...

    def search(
        self, where: Where, limit: int, dense: list[float] | None, sparse: Sparse | None
    ) -> list[Found]:
        """Nearest points; with both vectors, dense and keyword rankings fused (RRF)."""
        ...

    def set_payload(self, point_id: str, payload: dict[str, Any]) -> None:
        """Replace a point's payload (its vectors stay)."""
        ...

    def scroll(self, where: Where, limit: int) -> list[Found]: ...

    def count(self, where: Where) -> int: ...

    def delete(self, where: Where, ids: Sequence[str] = ()) -> int:
        """Delete points matching `where` (and, if given, with one of `ids`); how many."""
        ...

    def delete_expired(self, now: float) -> int:
        """Delete every point, of any tenant, whose ``expires_at`` is before `now`."""
        ...

    def maintain(self) -> None:
        """Background upkeep (the embedded engine builds its vector index here)."""
        ...

    def close(self) -> None: ...
