"""Memories in a Qdrant server (or `qdrant-client`'s local mode) through `qdrant-client`.

A server collection is created with the settings' shards, replicas and write consistency
(docs/memory.md: scaling on a cluster), keyword payload indexes (``tenant`` marked as the
tenant key, so its points are stored together) and float indexes on the times. Local mode
(a path or ``:memory:``) is the same engine logic without a server, used by tests; it
searches exhaustively and ignores payload indexes, so none are created there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qdrant_client import QdrantClient, models

from mesh.memory.backend import (
    DENSE,
    FLOAT_FIELDS,
    KEYWORD_FIELDS,
    SPARSE,
    CollectionSpec,
    Found,
    StoredPoint,
    Where,
)
from mesh.memory.embedding import Sparse
from mesh.wire.errors import ConfigError

RRF_K = 60


def _filter(where: Where, ids: Sequence[str] = ()) -> models.Filter:
    must: list[Any] = []
    for name, values in where.keywords():
        match: Any = (
            models.MatchValue(value=values[0]) if len(values) == 1 else models.MatchAny(any=list(values))
        )
        must.append(models.FieldCondition(key=name, match=match))
    if where.after is not None or where.before is not None:
        must.append(models.FieldCondition(key="at", range=models.Range(gte=where.after, lt=where.before)))
    if where.alive_at is not None:
        must.append(models.FieldCondition(key="expires_at", range=models.Range(gt=where.alive_at)))
    ids = (*where.ids, *ids)
    if ids:
        must.append(models.HasIdCondition(has_id=list(ids)))
    return models.Filter(must=must)


def _found(point: Any) -> Found:
    return Found(
        id=str(point.id), score=float(getattr(point, "score", 0.0) or 0.0), payload=dict(point.payload or {})
    )


class QdrantBackend:
    """`url` for a server; `path` (a directory or ``:memory:``) for local mode."""

    hybrid = True

    def __init__(
        self,
        collection: str,
        *,
        url: str | None = None,
        api_key: str | None = None,
        path: str | None = None,
        shards: int = 1,
        replicas: int = 1,
        write_consistency: int = 1,
    ) -> None:
        if (url is None) == (path is None):
            raise ConfigError("QdrantBackend needs exactly one of url (a server) or path (local mode)")
        self.collection = collection
        self.local = url is None
        self.name = "qdrant-local" if self.local else "qdrant"
        self._layout = {"shard_number": shards, "replication_factor": replicas}
        self._consistency = write_consistency
        if path is not None and path != ":memory:":
            self.client = QdrantClient(path=path)
        elif path is not None:
            self.client = QdrantClient(location=":memory:")
        else:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=10)

    def open(self, spec: CollectionSpec) -> None:
        name = self.collection
        if self.client.collection_exists(name):
            stored = self.client.get_collection(name).config.metadata
            spec.check(dict(stored) if stored else None, f"Qdrant collection {name}")
            return
        extra: dict[str, Any] = {}
        if not self.local:
            extra = {**self._layout, "write_consistency_factor": self._consistency}
        self.client.create_collection(
            name,
            vectors_config={DENSE: models.VectorParams(size=spec.dim, distance=models.Distance.COSINE)},
            sparse_vectors_config={SPARSE: models.SparseVectorParams(modifier=models.Modifier.IDF)},
            metadata=spec.to_json(),
            **extra,
        )
        if self.local:
            return
        self.client.create_payload_index(
            name,
            "tenant",
            models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True),
            wait=True,
        )
        for field in KEYWORD_FIELDS[1:]:
            self.client.create_payload_index(name, field, models.PayloadSchemaType.KEYWORD, wait=True)
        for field in FLOAT_FIELDS:
            self.client.create_payload_index(name, field, models.PayloadSchemaType.FLOAT, wait=True)

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        batch = []
        for p in points:
            vector: dict[str, Any] = {DENSE: p.dense}
            if p.sparse is not None and p.sparse.indices:
                vector[SPARSE] = models.SparseVector(indices=p.sparse.indices, values=p.sparse.values)
            batch.append(models.PointStruct(id=p.id, vector=vector, payload=p.payload))
        self.client.upsert(self.collection, points=batch, wait=True)

    def search(
        self, where: Where, limit: int, dense: list[float] | None, sparse: Sparse | None
    ) -> list[Found]:
        flt = _filter(where)
        scorers: list[tuple[Any, str]] = []
        if dense is not None:
            scorers.append((dense, DENSE))
        if sparse is not None and sparse.indices:
            scorers.append((models.SparseVector(indices=sparse.indices, values=sparse.values), SPARSE))
        if not scorers:
            return []
        if len(scorers) == 1:
            query, using = scorers[0]
            result = self.client.query_points(
                self.collection, query=query, using=using, query_filter=flt, limit=limit, with_payload=True
            )
        else:
            result = self.client.query_points(
                self.collection,
                prefetch=[models.Prefetch(query=q, using=u, filter=flt, limit=limit * 4) for q, u in scorers],
                query=models.RrfQuery(rrf=models.Rrf(k=RRF_K)),
                query_filter=flt,
                limit=limit,
                with_payload=True,
            )
        return [_found(p) for p in result.points]

    def set_payload(self, point_id: str, payload: dict[str, Any]) -> None:
        self.client.overwrite_payload(self.collection, payload=payload, points=[point_id], wait=True)

    def scroll(self, where: Where, limit: int) -> list[Found]:
        records, _ = self.client.scroll(
            self.collection, scroll_filter=_filter(where), limit=limit, with_payload=True
        )
        return [_found(r) for r in records]

    def count(self, where: Where) -> int:
        return self.client.count(self.collection, count_filter=_filter(where), exact=True).count

    def delete(self, where: Where, ids: Sequence[str] = ()) -> int:
        flt = _filter(where, ids)
        n = self.client.count(self.collection, count_filter=flt, exact=True).count
        if n:
            self.client.delete(self.collection, points_selector=models.FilterSelector(filter=flt), wait=True)
        return n

    def delete_expired(self, now: float) -> int:
        flt = models.Filter(must=[models.FieldCondition(key="expires_at", range=models.Range(lt=now))])
        n = self.client.count(self.collection, count_filter=flt, exact=True).count
        if n:
            self.client.delete(self.collection, points_selector=models.FilterSelector(filter=flt), wait=True)
        return n

    def maintain(self) -> None:
        """Nothing to do: a server indexes by itself; local mode searches exhaustively."""

    def close(self) -> None:
        self.client.close()
