"""Entities: typed nodes with attributes and typed relations, kept in the same Qdrant
collection as every other memory (docs/memory.md#entities).

An entity is one point of kind ``entity`` in its tenant's namespace. Its point id is derived
from (tenant, namespace, entity id), so looking an entity up by id is looking a point up by
id, under the tenant filter besides: an id can never resolve to another tenant's entity.
The payload holds the entity (type, attributes, relations) and ``targets``, the ids its
relations point to (an indexed keyword field), so relations can be followed backwards with
one filtered scroll. Its vectors embed a text rendering, so `recall` finds entities too.

A neighbourhood is a breadth-first walk from one entity: per depth level, one scroll for
the entities pointing at the level (when following both directions) and one lookup by ids
for those it points to, bounded by a number of entities so a hub cannot blow it up.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from mesh.memory.backend import StoredPoint, Where
from mesh.memory.messages import Edge, Entity, Neighbourhood, Provenance, Relation
from mesh.memory.store import MAX_SOURCES, NEVER, MemoryStore, Origin, point_id, refuse

T = TypeVar("T")
KIND = "entity"
ENTITY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")
NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # entity types and relation names
ATTRIBUTE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
MAX_ATTRIBUTES = 64
MAX_VALUE = 1024  # characters of a string attribute
MAX_RELATIONS = 256  # outgoing, per entity, after merging
MAX_DEPTH = 3
MAX_LIMIT = 200
DIRECTIONS = ("both", "out")
_SAFE_INT = 2**53  # beyond it a JSON number loses digits in other languages


def check_id(value: object, what: str = "entity id") -> str:
    if not isinstance(value, str) or not ENTITY_ID.match(value):
        raise refuse(
            "invalid",
            f"{what} {value!r} is not valid: 1-128 letters, digits or _.:@-, starting with a letter or digit",
        )
    return value


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise refuse(
            "invalid",
            f"{what} {value!r} is not valid: a lower-case word of 1-32 letters, digits or _ "
            f"(like person, works_on)",
        )
    return value


def check_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes as sent: names, value types and sizes checked. A None value removes the key."""
    if not isinstance(attributes, Mapping):
        raise refuse("invalid", f"attributes must be a JSON object, got {type(attributes).__name__}")
    if len(attributes) > MAX_ATTRIBUTES:
        raise refuse("oversize", f"{len(attributes)} attributes; an entity has at most {MAX_ATTRIBUTES}")
    for key, value in attributes.items():
        if not isinstance(key, str) or not ATTRIBUTE.match(key):
            raise refuse(
                "invalid",
                f"attribute name {key!r} is not valid: 1-64 letters, digits or _.-, starting with a letter",
            )
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, int):
            if abs(value) > _SAFE_INT:
                raise refuse("invalid", f"attribute {key!r}: {value} is beyond 2**53; send it as a string")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise refuse("invalid", f"attribute {key!r} is {value}: numbers must be finite")
        elif isinstance(value, str):
            if len(value) > MAX_VALUE:
                raise refuse(
                    "oversize",
                    f"attribute {key!r} is {len(value)} characters; the limit is {MAX_VALUE}: "
                    f"remember long text as a memory instead",
                )
        else:
            raise refuse(
                "invalid",
                f"attribute {key!r} must be a string, number, boolean or null (to remove it), "
                f"got {type(value).__name__}",
            )
    return dict(attributes)


def check_relations(relations: Iterable[Relation]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for r in relations:
        out.append((check_name(r.name, "relation name"), check_id(r.to, "relation target")))
        if len(out) > MAX_RELATIONS:
            raise refuse("oversize", f"more than {MAX_RELATIONS} relations in one request")
    return out


def render(
    entity_id: str, kind: str, attributes: Mapping[str, Any], relations: Sequence[tuple[str, str]]
) -> str:
    """The text an entity is embedded (and keyword-indexed) from."""
    head = f"{entity_id} ({kind})"
    attrs = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(attributes.items()))
    rels = "; ".join(f"{name.replace('_', ' ')} {to}" for name, to in relations)
    return ". ".join(part for part in (head, attrs, rels) if part)


def to_entity(payload: Mapping[str, Any], depth: int = 0) -> Entity:
    body = payload["entity"]
    return Entity(
        id=str(body["id"]),
        type=str(body["type"]),
        namespace=str(payload.get("namespace", "")),
        attributes=dict(body.get("attributes") or {}),
        relations=[Relation(name=r["name"], to=r["to"]) for r in body.get("relations") or []],
        provenance=Provenance(
            agent=str(payload.get("agent", "")),
            message_id=str(payload.get("message_id", "")),
            trace_id=str(payload.get("trace_id", "")),
            conversation=str(payload.get("conversation", "")),
            at=float(payload.get("at", 0.0)),
        ),
        updated_at=float(payload.get("updated_at", 0.0)),
        seen=int(payload.get("seen", 1)),
        depth=depth,
    )


def _unique(ids: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(ids))


class EntityGraph:
    """Upsert entities and walk their relations, in one tenant and namespace at a time."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    @staticmethod
    def point_of(tenant: str, namespace: str, entity_id: str) -> str:
        # "entity:" cannot be a memory kind, so no text memory ever gets this id
        return point_id(tenant, namespace, "entity:", entity_id)

    def _check_scope(self, tenant: str, namespace: str) -> None:
        self.store.check_tenant(tenant)
        self.store.check_namespace(namespace)

    async def _fetch(self, tenant: str, namespace: str, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The entities with these ids (absent ones left out), in one backend call."""
        if not ids:
            return {}
        points = tuple(self.point_of(tenant, namespace, i) for i in _unique(ids))
        where = Where(tenant=tenant, namespace=namespace, kinds=(KIND,), ids=points)
        rows = await self.store.run(self.store.backend.scroll, where, len(points))
        return {str(r.payload["entity"]["id"]): r.payload for r in rows}

    async def upsert(
        self,
        entity_id: str,
        *,
        tenant: str,
        origin: Origin,
        namespace: str = "default",
        type: str = "",
        attributes: Mapping[str, Any] | None = None,
        relations: Iterable[Relation] = (),
        unrelate: Iterable[Relation] = (),
    ) -> tuple[Entity, bool]:
        """Create the entity or merge into it; the stored entity, and whether it is new."""
        store = self.store
        self._check_scope(tenant, namespace)
        check_id(entity_id)
        if type:
            check_name(type, "entity type")
        changes = check_attributes(attributes if attributes is not None else {})
        add = check_relations(relations)
        drop = set(check_relations(unrelate))
        now = store.clock()
        source = origin.at(now)
        async with store.write_lock:
            old = (await self._fetch(tenant, namespace, [entity_id])).get(entity_id)
            if old is None:
                if not type:
                    raise refuse(
                        "invalid", f"entity {entity_id!r} is new: give it a type (person, project, ...)"
                    )
                payload: dict[str, Any] = {
                    "tenant": tenant,
                    "namespace": namespace,
                    "kind": KIND,
                    **source,
                    "expires_at": NEVER,
                    "seen": 1,
                    "sources": [source],
                }
                body: dict[str, Any] = {"attributes": {}, "relations": []}
            else:
                payload, body = dict(old), dict(old["entity"])
                sources = list(payload.get("sources") or [])
                # one handling may upsert an entity several times: count it once
                if not any(s.get("message_id") == source["message_id"] for s in sources):
                    payload["seen"] = int(payload.get("seen", 1)) + 1
                    payload["sources"] = [*sources, source][-MAX_SOURCES:]
            merged = {**body["attributes"], **changes}
            merged = {k: v for k, v in merged.items() if v is not None}
            if len(merged) > MAX_ATTRIBUTES:
                raise refuse(
                    "oversize",
                    f"entity {entity_id!r} would have {len(merged)} attributes; at most {MAX_ATTRIBUTES}",
                )
            links = _unique([*((r["name"], r["to"]) for r in body["relations"]), *add])
            links = [link for link in links if link not in drop]
            if len(links) > MAX_RELATIONS:
                raise refuse(
                    "oversize",
                    f"entity {entity_id!r} would have {len(links)} relations; at most {MAX_RELATIONS}",
                )
            kind = type or str(body["type"])
            text = render(entity_id, kind, merged, links)[: store.max_text]
            payload.update(
                entity={
                    "id": entity_id,
                    "type": kind,
                    "attributes": merged,
                    "relations": [{"name": name, "to": to} for name, to in links],
                },
                targets=sorted({to for _, to in links}),
                text=text,
                meta={"entity": entity_id, "type": kind},
                updated_at=now,
            )
            dense = await store.embed(text)
            point = StoredPoint(
                self.point_of(tenant, namespace, entity_id), dense, store.keywords.document(text), payload
            )
            await store.run(store.backend.upsert, [point])
        return to_entity(payload), old is None

    async def neighbourhood(
        self,
        entity_id: str,
        *,
        tenant: str,
        namespace: str = "default",
        depth: int = 1,
        direction: str = "both",
        limit: int = 50,
    ) -> Neighbourhood:
        """The entity and those within `depth` relations of it, at most `limit` of them,
        nearest first; the relations among them."""
        self._check_scope(tenant, namespace)
        check_id(entity_id)
        if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= MAX_DEPTH:
            raise refuse("invalid", f"depth must be between 0 and {MAX_DEPTH}, got {depth!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise refuse("invalid", f"limit must be between 1 and {MAX_LIMIT} entities, got {limit!r}")
        if direction not in DIRECTIONS:
            raise refuse("invalid", f"direction must be both or out, got {direction!r}")
        found: dict[str, tuple[dict[str, Any], int]] = {
            i: (p, 0) for i, p in (await self._fetch(tenant, namespace, [entity_id])).items()
        }
        frontier = list(found)
        truncated = False
        for level in range(1, depth + 1):
            if not frontier:
                break
            room = limit - len(found)
            outgoing = _unique(
                r["to"] for i in frontier for r in found[i][0]["entity"]["relations"] if r["to"] not in found
            )
            fetched: dict[str, dict[str, Any]] = {}
            incoming: list[str] = []
            if direction == "both":
                # room + 1 unseen ones at least, if there are that many: enough to know it is cut
                pointing = Where(tenant=tenant, namespace=namespace, kinds=(KIND,), targets=tuple(frontier))
                rows = await self.store.run(self.store.backend.scroll, pointing, room + len(found) + 1)
                for row in rows:
                    i = str(row.payload["entity"]["id"])
                    if i not in found:
                        fetched[i] = row.payload
                incoming = sorted(fetched)
            lookup = [i for i in outgoing if i not in fetched]
            cap = max(2 * room, 16)  # ids that may not exist (relations to nothing yet) allowed for
            if len(lookup) > cap:
                truncated, lookup = True, lookup[:cap]
            fetched.update(await self._fetch(tenant, namespace, lookup))
            new = [i for i in _unique([*outgoing, *incoming]) if i in fetched]
            if len(new) > room:
                truncated, new = True, new[: max(room, 0)]
            for i in new:
                found[i] = (fetched[i], level)
            frontier = new
        edges = [
            Edge(source=i, name=r["name"], target=r["to"])
            for i, (payload, _) in found.items()
            for r in payload["entity"]["relations"]
            if r["to"] in found
        ]
        entities = [to_entity(payload, d) for payload, d in found.values()]
        return Neighbourhood(root=entity_id, entities=entities, edges=edges, truncated=truncated)
