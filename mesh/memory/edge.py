"""The Qdrant engine embedded in the memory service process (`qdrant-edge-py`).

One shard under ``<data_dir>/memory/<collection>``, written through its write-ahead log
(so an acknowledged write survives a process restart), with the same payload indexes,
dense + BM25 sparse vectors and RRF fusion as a Qdrant server. One process owns a shard
directory: replicate the memory service with a Qdrant server instead.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import qdrant_edge as qe

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

SPEC_FILE = "mesh-memory.json"
RRF_K = 60


def _filter(where: Where, ids: Sequence[str] = ()) -> qe.Filter:
    must: list[Any] = []
    for name, values in where.keywords():
        match: Any = qe.MatchValue(values[0]) if len(values) == 1 else qe.MatchAny(list(values))
        must.append(qe.FieldCondition(name, match=match))
    if where.after is not None or where.before is not None:
        must.append(qe.FieldCondition("at", range=qe.RangeFloat(gte=where.after, lt=where.before)))
    if where.alive_at is not None:
        must.append(qe.FieldCondition("expires_at", range=qe.RangeFloat(gt=where.alive_at)))
    ids = (*where.ids, *ids)
    if ids:
        must.append(qe.HasIdCondition(set(ids)))
    return qe.Filter(must=must)


def _found(point: Any) -> Found:
    return Found(
        id=str(point.id), score=float(getattr(point, "score", 0.0)), payload=dict(point.payload or {})
    )


class EdgeBackend:
    name = "edge"
    hybrid = True

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._shard: qe.EdgeShard | None = None
        self._lock = threading.Lock()  # one writer at a time; reads run alongside

    @property
    def shard(self) -> qe.EdgeShard:
        if self._shard is None:
            raise RuntimeError("EdgeBackend.open() was not called")
        return self._shard

    def open(self, spec: CollectionSpec) -> None:
        spec_file = self.directory / SPEC_FILE
        shard_dir = self.directory / "shard"
        if spec_file.exists():
            spec.check(CollectionSpec.parse(spec_file.read_text()), str(self.directory))
        if shard_dir.exists() and any(shard_dir.iterdir()):
            try:
                self._shard = qe.EdgeShard.load(str(shard_dir))
            except Exception as exc:
                raise ConfigError(f"cannot open the memory shard at {shard_dir}: {exc}") from exc
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        config = qe.EdgeConfig(
            vectors={DENSE: qe.EdgeVectorParams(size=spec.dim, distance=qe.Distance.Cosine)},
            sparse_vectors={SPARSE: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        )
        self._shard = qe.EdgeShard.create(str(shard_dir), config)
        self._shard.update(
            qe.UpdateOperation.create_field_index("tenant", qe.KeywordIndexParams(is_tenant=True))
        )
        for name in KEYWORD_FIELDS[1:]:
            self._shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))
        for name in FLOAT_FIELDS:
            self._shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Float))
        self._shard.flush()
        spec_file.write_text(json.dumps(spec.to_json()))

    def upsert(self, points: Sequence[StoredPoint]) -> None:
        batch = []
        for p in points:
            vector: dict[str, Any] = {DENSE: p.dense}
            if p.sparse is not None and p.sparse.indices:
                vector[SPARSE] = qe.SparseVector(p.sparse.indices, p.sparse.values)
            batch.append(qe.Point(p.id, vector, p.payload))
        with self._lock:
            self.shard.update(qe.UpdateOperation.upsert_points(batch))

    def search(
        self, where: Where, limit: int, dense: list[float] | None, sparse: Sparse | None
    ) -> list[Found]:
        flt = _filter(where)
        scorers: list[Any] = []
        if dense is not None:
            scorers.append(qe.Query.Nearest(dense, using=DENSE))
        if sparse is not None and sparse.indices:
            scorers.append(qe.Query.Nearest(qe.SparseVector(sparse.indices, sparse.values), using=SPARSE))
        if not scorers:
            return []
        if len(scorers) == 1:
            request = qe.QueryRequest(limit=limit, query=scorers[0], filter=flt, with_payload=True)
        else:  # each ranking is filtered, then the two are fused
            request = qe.QueryRequest(
                limit=limit,
                prefetches=[qe.Prefetch(limit=limit * 4, query=q, filter=flt) for q in scorers],
                query=qe.Fusion.Rrf(k=RRF_K),  # type: ignore[arg-type]  # the stub omits nested Fusion kinds
                filter=flt,
                with_payload=True,
            )
        return [_found(p) for p in self.shard.query(request)]

    def set_payload(self, point_id: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self.shard.update(qe.UpdateOperation.overwrite_payload([point_id], payload))

    def scroll(self, where: Where, limit: int) -> list[Found]:
        records, _ = self.shard.scroll(
            qe.ScrollRequest(limit=limit, filter=_filter(where), with_payload=True)
        )
        return [_found(r) for r in records]

    def count(self, where: Where) -> int:
        return self.shard.count(qe.CountRequest(exact=True, filter=_filter(where)))

    def delete(self, where: Where, ids: Sequence[str] = ()) -> int:
        flt = _filter(where, ids)
        with self._lock:
            n = self.shard.count(qe.CountRequest(exact=True, filter=flt))
            if n:
                self.shard.update(qe.UpdateOperation.delete_points_by_filter(flt))
        return n

    def delete_expired(self, now: float) -> int:
        flt = qe.Filter(must=[qe.FieldCondition("expires_at", range=qe.RangeFloat(lt=now))])
        with self._lock:
            n = self.shard.count(qe.CountRequest(exact=True, filter=flt))
            if n:
                self.shard.update(qe.UpdateOperation.delete_points_by_filter(flt))
        return n

    def maintain(self) -> None:
        """Merge small segments and build the HNSW index over what was written."""
        self.shard.optimize()

    def close(self) -> None:
        if self._shard is not None:
            with self._lock:
                self._shard.flush()
                self._shard.close()
            self._shard = None
