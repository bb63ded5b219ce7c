"""One sample of each shared-memory message type, for the round trips in test_messages."""

from __future__ import annotations

from mesh.schemas import memory as m
from sample_agents.memo import Note, Noted

from mesh.wire.messages import Message

_prov = m.Provenance(agent="research", message_id="M1", trace_id="0" * 32, conversation="c1", at=1.5)
_hit = m.MemoryHit(
    id="6c1f4d3e-8f0a-5b7c-9d2e-3a4b5c6d7e8f",
    text="Refunds take 5 days",
    score=0.5,
    kind="fact",
    namespace="default",
    provenance=_prov,
    seen=2,
    sources=[_prov],
    expires_at=2.0,
    meta={"k": "v"},
)
_turn = m.Turn(role="user", text="hi", agent="a", at=1.0)
_works_on = m.Relation(name="works_on", to="apollo")
_entity = m.Entity(
    id="ada",
    type="person",
    namespace="default",
    attributes={"name": "Ada", "age": 36, "lead": True, "score": 0.5},
    relations=[_works_on],
    provenance=_prov,
    updated_at=2.0,
    seen=2,
    depth=1,
)

ALL: list[Message] = [
    m.Remember(text="t", kind="episode", ttl=60.0, meta={"k": "v"}, vector=[0.1, 0.2]),
    m.Remembered(id=_hit.id, merged=True, seen=2),
    m.Recall(query="q", k=3, where={"kind": ["fact"], "after": 1.0}, mode="dense"),
    m.Recalled(hits=[_hit], mode="hybrid"),
    m.Forget(ids=[_hit.id], where={"conversation": "c1"}),
    m.Forgotten(count=1),
    m.AddTurn(role="user", text="hi"),
    m.GetHistory(tenant="acme"),
    m.History(conversation="c1", summary="s", turns=[_turn], tokens=3, compressed=1),
    m.MemoryFailed(kind="oversize", reason="too long"),
    m.UpsertEntity(
        id="ada", type="person", attributes={"name": "Ada", "gone": None}, relations=[_works_on], unrelate=[]
    ),
    m.EntityStored(entity=_entity, created=True),
    m.GetNeighbourhood(id="ada", depth=2, direction="out", limit=10, namespace="kb"),
    m.Neighbourhood(
        root="ada", entities=[_entity], edges=[m.Edge(source="ada", name="works_on", target="apollo")]
    ),
    Note(text="n", recall="q", writer="w"),
    Noted(text="n", id="i", recalled=["r"], sources=["a/b/c"], pid=1),
]
