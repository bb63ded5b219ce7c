"""The memory store: what the memory service does with a request, whichever backend.

It validates input (a `MemoryRefused` with a kind names what is wrong), embeds in batches,
scopes every read and write to one tenant, stamps provenance, merges near-duplicates and
keeps TTLs. Backend calls run in a worker thread so the service's event loop stays free.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mesh.memory.backend import CollectionSpec, Found, MemoryBackend, StoredPoint, Where
from mesh.memory.batching import Batcher
from mesh.memory.embedding import Embedder, KeywordEncoder, make_embedder
from mesh.wire.errors import ConfigError, MemoryRefused
from mesh.wire.settings import Settings

T = TypeVar("T")
NEVER = 1e15  # expires_at of a memory without TTL (a range index needs a number)
MAX_K = 100
MAX_SOURCES = 5
WORKING = "_working"  # the namespace of working memory; user namespaces start alphanumeric
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ID_SPACE = uuid.UUID("6c1f4d3e-8f0a-5b7c-9d2e-3a4b5c6d7e8f")
_FILTER_KEYS = {"agent": "agents", "conversation": "conversations", "kind": "kinds"}


@dataclass(frozen=True, slots=True)
class Origin:
    """Who caused a write: provenance stamped on the point."""

    agent: str
    message_id: str
    trace_id: str
    conversation: str

    def at(self, when: float) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "message_id": self.message_id,
            "trace_id": self.trace_id,
            "conversation": self.conversation,
            "at": when,
        }


@dataclass(frozen=True, slots=True)
class Stored:
    id: str
    merged: bool
    seen: int


def refuse(kind: str, reason: str) -> MemoryRefused:
    return MemoryRefused(kind, reason)


def point_id(*parts: str) -> str:
    return str(uuid.uuid5(_ID_SPACE, "\x00".join(parts)))


def parse_where(tenant: str, namespace: str | None, where: Mapping[str, Any], now: float) -> Where:
    """Turn a request's JSON filter into a `Where` scoped to `tenant`; `bad_filter` if malformed."""
    if not isinstance(where, Mapping):
        raise refuse("bad_filter", f"where must be a JSON object, got {type(where).__name__}")
    fields: dict[str, Any] = {}
    for key, value in where.items():
        if key in _FILTER_KEYS:
            values = [value] if isinstance(value, str) else value
            if (
                not isinstance(values, list)
                or not values
                or len(values) > 64
                or not all(isinstance(v, str) and 0 < len(v) <= 128 for v in values)
            ):
                raise refuse("bad_filter", f"where.{key} must be a string or a list of 1-64 strings")
            fields[_FILTER_KEYS[key]] = tuple(values)
        elif key in ("after", "before"):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise refuse("bad_filter", f"where.{key} must be a number (Unix seconds), got {value!r}")
            fields[key] = float(value)
        else:
            raise refuse(
                "bad_filter",
                f"where has an unknown key {key!r}; use agent, conversation, kind, after, before",
            )
    return Where(tenant=tenant, namespace=namespace, alive_at=now, **fields)


class MemoryStore:
    """Shared memory over one backend and one embedder."""

    def __init__(
        self,
        backend: MemoryBackend,
        embedder: Embedder,
        *,
        collection: str = "mesh_memory",
        tenants: frozenset[str] | None = frozenset({"default"}),
        max_text: int = 8192,
        dedupe: float = 0.92,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.backend = backend
        self.embedder = embedder
        self.keywords = KeywordEncoder()
        self.spec = CollectionSpec(collection, embedder.name, embedder.dim, self.keywords.name)
        self.tenants = tenants  # None: any tenant
        self.max_text = max_text
        self.dedupe = dedupe
        self.clock = clock
        self._batcher = Batcher(embedder)
        self._write = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, *, embedder: Embedder | None = None) -> MemoryStore:
        return cls(
            open_backend(settings),
            embedder or make_embedder(settings),
            collection=settings.qdrant_collection,
            tenants=_tenants(settings.memory_tenants),
            max_text=settings.memory_max_text,
            dedupe=settings.memory_dedupe,
        )

    async def open(self) -> MemoryStore:
        await self.run(self.backend.open, self.spec)
        return self

    async def close(self) -> None:
        await self.run(self.backend.close)

    @property
    def write_lock(self) -> asyncio.Lock:
        """Held around every read-modify-write of this store (merges, deletes, entities)."""
        return self._write

    @staticmethod
    async def run(fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # ---------------------------------------------------------------- checks

    def check_tenant(self, tenant: str) -> str:
        if not _NAME.match(tenant):
            raise refuse("invalid", f"tenant {tenant!r} is not a valid name (letters, digits, _.:-)")
        if self.tenants is not None and tenant not in self.tenants:
            raise refuse(
                "unknown_tenant",
                f"tenant {tenant!r} is not served here; add it to MESH_MEMORY_TENANTS on the memory service",
            )
        return tenant

    def check_namespace(self, namespace: str) -> str:
        if not _NAME.match(namespace):
            raise refuse("invalid", f"namespace {namespace!r} is not a valid name (letters, digits, _.:-)")
        return namespace

    def check_text(self, text: str, what: str = "text") -> str:
        if len(text) > self.max_text:
            raise refuse(
                "oversize",
                f"{what} is {len(text)} characters; the limit is {self.max_text} (MESH_MEMORY_MAX_TEXT): "
                f"split it into several memories",
            )
        return text

    def check_vector(self, vector: Sequence[float] | None) -> list[float] | None:
        if vector is None:
            return None
        if len(vector) != self.embedder.dim:
            raise refuse(
                "dimension",
                f"vector has {len(vector)} dimensions; this memory uses {self.embedder.name} with "
                f"{self.embedder.dim}",
            )
        if not all(math.isfinite(x) for x in vector):
            raise refuse("dimension", "vector has a NaN or infinite component")
        return list(vector)

    async def embed(self, text: str) -> list[float]:
        return await self._batcher.embed(text)

    # ---------------------------------------------------------------- operations

    async def remember(
        self,
        text: str,
        *,
        tenant: str,
        origin: Origin,
        kind: str = "fact",
        namespace: str = "default",
        ttl: float | None = None,
        meta: Mapping[str, str] | None = None,
        vector: Sequence[float] | None = None,
        extra: Mapping[str, Any] | None = None,
        merge: bool = True,
        pid: str | None = None,
    ) -> Stored:
        """Store a memory, or merge it into a near-duplicate (cosine >= MESH_MEMORY_DEDUPE)
        of the same tenant, namespace and kind. `merge=False` and a `pid` store it as is."""
        self.check_tenant(tenant)
        if namespace != WORKING:
            self.check_namespace(namespace)
        self.check_text(text)
        if not text.strip():
            raise refuse("invalid", "text is empty: there is nothing to remember")
        if not _KIND.match(kind):
            raise refuse(
                "invalid", f"kind {kind!r} is not valid: lower-case words like fact, episode, entity"
            )
        if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
            raise refuse("invalid", f"ttl must be a positive number of seconds, got {ttl!r}")
        dense = self.check_vector(vector) or await self.embed(text)
        sparse = self.keywords.document(text)
        now = self.clock()
        expires = now + ttl if ttl is not None else NEVER
        source = origin.at(now)
        async with self._write:
            scope = Where(tenant=tenant, namespace=namespace, kinds=(kind,), alive_at=now)
            near = await self.run(self.backend.search, scope, 1, dense, None) if merge else []
            # a structured entity (mesh.memory.entities) is merged into only by an upsert
            if near and near[0].score >= self.dedupe and "entity" not in near[0].payload:
                return await self._merge(near[0], source, expires)
            pid = pid or point_id(tenant, namespace, kind, " ".join(text.lower().split()))
            payload = {
                "tenant": tenant,
                "namespace": namespace,
                "kind": kind,
                "text": text,
                **source,
                "updated_at": now,
                "expires_at": expires,
                "seen": 1,
                "meta": dict(meta or {}),
                "sources": [source],
                **(extra or {}),
            }
            await self.run(self.backend.upsert, [StoredPoint(pid, dense, sparse, payload)])
        return Stored(pid, False, 1)

    async def _merge(self, found: Found, source: dict[str, Any], expires: float) -> Stored:
        payload = dict(found.payload)
        sources = list(payload.get("sources") or [])
        if any(s.get("message_id") == source["message_id"] for s in sources):
            return Stored(found.id, True, int(payload.get("seen", 1)))  # the same request again
        payload["seen"] = int(payload.get("seen", 1)) + 1
        payload["sources"] = [*sources, source][-MAX_SOURCES:]
        payload["updated_at"] = source["at"]
        payload["expires_at"] = max(float(payload.get("expires_at", NEVER)), expires)
        await self.run(self.backend.set_payload, found.id, payload)
        return Stored(found.id, True, payload["seen"])

    async def recall(
        self,
        query: str,
        *,
        tenant: str,
        k: int = 5,
        namespace: str = "default",
        where: Mapping[str, Any] | None = None,
        mode: str = "hybrid",
        vector: Sequence[float] | None = None,
    ) -> tuple[list[Found], str]:
        self.check_tenant(tenant)
        self.check_namespace(namespace)
        self.check_text(query, "query")
        if not 1 <= k <= MAX_K:
            raise refuse("invalid", f"k must be between 1 and {MAX_K}, got {k}")
        if mode not in ("hybrid", "dense", "keyword"):
            raise refuse("invalid", f"mode must be hybrid, dense or keyword, got {mode!r}")
        scope = parse_where(tenant, namespace, where or {}, self.clock())
        if mode == "hybrid" and not self.backend.hybrid:
            mode = "dense"
        dense = None
        if mode != "keyword":
            dense = self.check_vector(vector) or await self.embed(query)
        sparse = self.keywords.query(query) if mode != "dense" else None
        return await self.run(self.backend.search, scope, k, dense, sparse), mode

    async def forget(
        self,
        *,
        tenant: str,
        namespace: str = "default",
        ids: Sequence[str] = (),
        where: Mapping[str, Any] | None = None,
    ) -> int:
        self.check_tenant(tenant)
        self.check_namespace(namespace)
        if not ids and not where:
            raise refuse("invalid", "forget needs ids or a filter (where); it never forgets everything")
        for i in ids:
            try:
                uuid.UUID(i)
            except (ValueError, TypeError, AttributeError):
                raise refuse("invalid", f"{i!r} is not a memory id (a UUID)") from None
        scope = parse_where(tenant, namespace, where or {}, self.clock())
        scope = Where(**{**_fields(scope), "alive_at": None})
        async with self._write:
            return await self.run(self.backend.delete, scope, list(ids))

    async def sweep(self) -> int:
        """Delete expired memories of every tenant."""
        async with self._write:
            return await self.run(self.backend.delete_expired, self.clock())


def _fields(where: Where) -> dict[str, Any]:
    return {name: getattr(where, name) for name in where.__dataclass_fields__}


def _tenants(value: str) -> frozenset[str] | None:
    names = frozenset(t.strip() for t in value.split(",") if t.strip())
    return None if "*" in names else names


def open_backend(settings: Settings) -> MemoryBackend:
    """The backend the settings ask for: a Qdrant server, qdrant-client local mode or the
    embedded engine (docs/memory.md)."""
    from mesh.memory.qdrant import QdrantBackend

    kind = settings.memory_backend
    if kind == "auto":
        kind = "qdrant" if settings.qdrant_url else "edge"
    collection = settings.qdrant_collection
    if kind == "qdrant":
        if not settings.qdrant_url:
            raise ConfigError("MESH_MEMORY_BACKEND=qdrant needs MESH_QDRANT_URL")
        return QdrantBackend(
            collection,
            url=settings.qdrant_url,
            api_key=settings.qdrant_api_key,
            shards=settings.qdrant_shards,
            replicas=settings.qdrant_replicas,
            write_consistency=settings.qdrant_write_consistency,
        )
    base = Path(settings.data_dir) / "memory"
    if kind == "qdrant-local":
        base.mkdir(parents=True, exist_ok=True)
        return QdrantBackend(collection, path=str(base / "qdrant-local"))
    from mesh.memory.edge import EdgeBackend

    return EdgeBackend(base / collection)
