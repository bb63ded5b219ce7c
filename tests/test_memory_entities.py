"""Entities on both real backends (the embedded Qdrant engine and qdrant-client's local mode):
upsert and merge, neighbourhoods at depth 1 and 2, the bound on a hub, tenant isolation,
hostile input refused, and entities found by semantic recall."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mesh.memory.backend import MemoryBackend
from mesh.memory.edge import EdgeBackend
from mesh.memory.embedding import HashEmbedder
from mesh.memory.entities import EntityGraph
from mesh.memory.messages import Neighbourhood, Relation
from mesh.memory.qdrant import QdrantBackend
from mesh.memory.store import MemoryStore, Origin
from mesh.wire.errors import MemoryRefused

BACKENDS: dict[str, Callable[[Path], MemoryBackend]] = {
    "edge": lambda d: EdgeBackend(d / "edge"),
    "qdrant-local": lambda d: QdrantBackend("memories", path=str(d / "qdrant-local")),
}


@pytest.fixture(params=sorted(BACKENDS))
async def graph(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EntityGraph]:
    store = MemoryStore(
        BACKENDS[request.param](tmp_path),
        HashEmbedder(256),
        tenants=frozenset({"default", "acme", "globex"}),
        clock=lambda: 1_700_000_000.0,
    )
    await store.open()
    try:
        yield EntityGraph(store)
    finally:
        await store.close()


def origin(n: int = 0, agent: str = "tester") -> Origin:
    return Origin(agent=agent, message_id=f"m{n}", trace_id=f"{n:032x}", conversation="c1")


def rel(*pairs: tuple[str, str]) -> list[Relation]:
    return [Relation(name=name, to=to) for name, to in pairs]


async def upsert(graph: EntityGraph, entity_id: str, n: int = 0, tenant: str = "default", **kw: Any) -> Any:
    entity, _ = await graph.upsert(entity_id, tenant=tenant, origin=origin(n), **kw)
    return entity


def around(graph: EntityGraph, id: str = "ada", **kw: Any) -> Awaitable[Neighbourhood]:
    return graph.neighbourhood(id, tenant="default", **kw)


def shape(found: Neighbourhood) -> tuple[dict[str, int], set[tuple[str, str, str]]]:
    """Entities by depth, and the edges as (source, name, target)."""
    return {e.id: e.depth for e in found.entities}, {(e.source, e.name, e.target) for e in found.edges}


async def test_upsert_creates_then_merges_attributes_and_relations(graph: EntityGraph) -> None:
    first, created = await graph.upsert(
        "ada",
        tenant="default",
        origin=origin(1, "research"),
        type="person",
        attributes={"name": "Ada Lovelace", "role": "analyst", "age": 36},
        relations=rel(("works_on", "apollo")),
    )
    assert created and first.type == "person" and first.seen == 1
    merged, created = await graph.upsert(
        "ada",
        tenant="default",
        origin=origin(2, "writer"),
        attributes={"role": "lead", "age": None, "email": "ada@example.com"},
        relations=rel(("reports_to", "grace"), ("works_on", "apollo")),  # works_on: already there
    )
    assert not created
    assert merged.type == "person"  # an empty type keeps the stored one
    assert merged.attributes == {"name": "Ada Lovelace", "role": "lead", "email": "ada@example.com"}
    assert merged.relations == rel(("works_on", "apollo"), ("reports_to", "grace"))
    assert merged.seen == 2 and merged.provenance is not None
    assert (merged.provenance.agent, merged.provenance.message_id) == ("research", "m1")  # the first write
    # the same handling upserting again is counted once; unrelate removes a relation
    again = await upsert(graph, "ada", 2, type="engineer", unrelate=rel(("works_on", "apollo")))
    assert (again.type, again.seen, again.relations) == ("engineer", 2, rel(("reports_to", "grace")))
    stored = await around(graph, depth=0)
    assert stored.entities == [again] and stored.edges == []


async def _team(graph: EntityGraph, tenant: str = "default") -> None:
    """ada -works_on-> apollo <-works_on- bob; ada -reports_to-> grace -works_on-> hermes
    -depends_on-> zeus; ada -knows-> nobody (never stored)."""
    await upsert(graph, "apollo", tenant=tenant, type="project", attributes={"goal": "moon"})
    await upsert(graph, "hermes", tenant=tenant, type="project", relations=rel(("depends_on", "zeus")))
    await upsert(graph, "zeus", tenant=tenant, type="project")
    await upsert(graph, "grace", tenant=tenant, type="person", relations=rel(("works_on", "hermes")))
    await upsert(graph, "bob", tenant=tenant, type="person", relations=rel(("works_on", "apollo")))
    await upsert(
        graph,
        "ada",
        tenant=tenant,
        type="person",
        relations=rel(("works_on", "apollo"), ("reports_to", "grace"), ("knows", "nobody")),
    )


async def test_neighbourhood_at_depth_one_and_two(graph: EntityGraph) -> None:
    await _team(graph)
    one = await around(graph, depth=1)
    assert shape(one) == (
        {"ada": 0, "apollo": 1, "grace": 1},
        {("ada", "works_on", "apollo"), ("ada", "reports_to", "grace")},
    )
    assert one.entities[0].id == "ada" and not one.truncated
    assert one.entities[1].attributes == {"goal": "moon"}
    two = await around(graph, depth=2)
    assert shape(two) == (
        {"ada": 0, "apollo": 1, "grace": 1, "bob": 2, "hermes": 2},  # bob: apollo's incoming relation
        {
            ("ada", "works_on", "apollo"),
            ("ada", "reports_to", "grace"),
            ("bob", "works_on", "apollo"),
            ("grace", "works_on", "hermes"),
        },
    )
    out = await around(graph, depth=2, direction="out")
    assert set(shape(out)[0]) == {"ada", "apollo", "grace", "hermes"}  # no bob: he points in
    backwards = await graph.neighbourhood("zeus", tenant="default", depth=2)
    assert shape(backwards)[0] == {"zeus": 0, "hermes": 1, "grace": 2}
    assert await graph.neighbourhood("zeus", tenant="default", depth=2, direction="out") == Neighbourhood(
        root="zeus", entities=backwards.entities[:1], edges=[]
    )
    unknown = await graph.neighbourhood("nobody", tenant="default", depth=2)
    assert (unknown.entities, unknown.edges) == ([], [])


async def test_a_hub_is_cut_at_the_limit(graph: EntityGraph) -> None:
    await upsert(graph, "hub", type="project")
    for n in range(30):
        await upsert(graph, f"member-{n:02d}", n, type="person", relations=rel(("works_on", "hub")))
    cut = await graph.neighbourhood("hub", tenant="default", depth=2, limit=10)
    assert cut.truncated and len(cut.entities) == 10 and cut.entities[0].id == "hub"
    assert {e.target for e in cut.edges} == {"hub"} and len(cut.edges) == 9
    whole = await graph.neighbourhood("hub", tenant="default", depth=2, limit=31)
    assert not whole.truncated and len(whole.entities) == 31
    # outgoing: an entity pointing at every member
    await upsert(
        graph, "roster", type="team", relations=rel(*(("has", f"member-{n:02d}") for n in range(30)))
    )
    out = await graph.neighbourhood("roster", tenant="default", depth=1, direction="out", limit=5)
    assert out.truncated and [e.id for e in out.entities] == [
        "roster",
        *(f"member-{n:02d}" for n in range(4)),
    ]


async def test_one_tenant_never_sees_or_links_to_anothers_entities(graph: EntityGraph) -> None:
    await upsert(graph, "apollo", tenant="acme", type="project", attributes={"budget": "secret"})
    await upsert(graph, "ada", tenant="acme", type="person", relations=rel(("works_on", "apollo")))
    # globex relates its own eve to an id that exists only in acme
    eve = await upsert(graph, "eve", tenant="globex", type="person", relations=rel(("works_on", "apollo")))
    assert eve.relations == rel(("works_on", "apollo"))
    theirs = await graph.neighbourhood("eve", tenant="globex", depth=2)
    assert shape(theirs) == ({"eve": 0}, set())  # acme's apollo is not reached
    assert (await graph.neighbourhood("apollo", tenant="globex", depth=2)).entities == []
    ours = await graph.neighbourhood("apollo", tenant="acme", depth=2)
    assert shape(ours) == ({"apollo": 0, "ada": 1}, {("ada", "works_on", "apollo")})  # no eve
    # globex's own apollo is another entity: acme's attributes stay acme's
    await upsert(graph, "apollo", tenant="globex", type="project")
    theirs = await graph.neighbourhood("eve", tenant="globex", depth=1)
    assert [e.attributes for e in theirs.entities if e.id == "apollo"] == [{}]
    assert (await graph.neighbourhood("apollo", tenant="acme")).entities[0].attributes == {"budget": "secret"}
    # and a namespace is a boundary too
    assert (await graph.neighbourhood("apollo", tenant="acme", namespace="other")).entities == []


async def test_hostile_input_is_refused_with_a_clear_error(graph: EntityGraph) -> None:
    await upsert(graph, "ada", type="person")
    many = {f"k{n}": n for n in range(65)}
    cases: list[tuple[Callable[[], Awaitable[Any]], str, str]] = [
        (lambda: upsert(graph, "", type="person"), "invalid", "entity id ''"),
        (lambda: upsert(graph, "a" * 129, type="person"), "invalid", "1-128 letters"),
        (lambda: upsert(graph, "ada lovelace", type="person"), "invalid", "entity id 'ada lovelace'"),
        (lambda: upsert(graph, "../etc", type="person"), "invalid", "entity id"),
        (lambda: upsert(graph, "new-one"), "invalid", "is new: give it a type"),
        (lambda: upsert(graph, "ada", type="Person!"), "invalid", "entity type 'Person!'"),
        (lambda: upsert(graph, "ada", relations=rel(("WorksOn", "x"))), "invalid", "relation name"),
        (lambda: upsert(graph, "ada", relations=rel(("knows", "bad id"))), "invalid", "relation target"),
        (lambda: upsert(graph, "ada", attributes={"bad key": 1}), "invalid", "attribute name 'bad key'"),
        (lambda: upsert(graph, "ada", attributes={"x": [1, 2]}), "invalid", "got list"),
        (lambda: upsert(graph, "ada", attributes={"x": float("nan")}), "invalid", "finite"),
        (lambda: upsert(graph, "ada", attributes={"x": 2**60}), "invalid", "2**53"),
        (lambda: upsert(graph, "ada", attributes={"x": "y" * 1025}), "oversize", "1025 characters"),
        (lambda: upsert(graph, "ada", attributes=many), "oversize", "65 attributes"),
        (
            lambda: upsert(graph, "ada", relations=rel(*(("knows", f"p{n}") for n in range(257)))),
            "oversize",
            "more than 256 relations",
        ),
        (lambda: upsert(graph, "ada", tenant="initech", type="person"), "unknown_tenant", "initech"),
        (lambda: upsert(graph, "ada", namespace="_working", type="person"), "invalid", "namespace"),
        (
            lambda: around(graph, depth=4),
            "invalid",
            "depth must be between 0 and 3",
        ),
        (lambda: around(graph, depth=-1), "invalid", "depth"),
        (
            lambda: around(graph, limit=0),
            "invalid",
            "limit must be between 1 and 200",
        ),
        (lambda: around(graph, limit=201), "invalid", "limit"),
        (lambda: around(graph, direction="in"), "invalid", "direction"),
        (lambda: around(graph, "a b"), "invalid", "entity id 'a b'"),
    ]
    for call, kind, fragment in cases:
        with pytest.raises(MemoryRefused) as refused:
            await call()
        assert (refused.value.kind, fragment in refused.value.reason) == (kind, True), refused.value.reason
    # attributes accumulated past the limit by merging are refused too, and nothing changed
    await upsert(graph, "ada", attributes={f"a{n}": n for n in range(60)})
    with pytest.raises(MemoryRefused, match="would have 70 attributes"):
        await upsert(graph, "ada", attributes={f"b{n}": n for n in range(10)})
    [ada] = (await around(graph, depth=0)).entities
    assert len(ada.attributes) == 60 and ada.type == "person"


async def test_an_entity_is_found_by_semantic_recall(graph: EntityGraph) -> None:
    await _team(graph)
    await upsert(
        graph,
        "ada",
        attributes={"name": "Ada Lovelace", "known_for": "the first program for the analytical engine"},
    )
    await graph.store.remember("Refunds take five days", tenant="default", origin=origin(9))
    found, _ = await graph.store.recall(
        "who wrote a program for the analytical engine", tenant="default", k=3
    )
    assert found[0].payload["meta"] == {"entity": "ada", "type": "person"}
    assert "Ada Lovelace" in found[0].payload["text"]
    only, _ = await graph.store.recall("refunds", tenant="default", k=10, where={"kind": "entity"})
    assert all(f.payload["kind"] == "entity" for f in only) and only
    # a free-text memory of kind entity, even word for word, never merges into a structured one
    text = found[0].payload["text"]
    note = await graph.store.remember(text, tenant="default", origin=origin(10), kind="entity")
    assert not note.merged and note.id != found[0].id
    [ada] = (await around(graph, depth=0)).entities
    assert ada.seen == 1 and ada.attributes["name"] == "Ada Lovelace"  # untouched by the remember
