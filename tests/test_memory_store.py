"""The memory store on both real backends: the embedded Qdrant engine (qdrant-edge-py) and
qdrant-client's local mode. The same tests run on each."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from memory_facts import FACTS, distractors

from mesh.memory.backend import MemoryBackend
from mesh.memory.edge import EdgeBackend
from mesh.memory.embedding import HashEmbedder
from mesh.memory.qdrant import QdrantBackend
from mesh.memory.store import MemoryStore, Origin
from mesh.wire.errors import ConfigError, MemoryRefused

BACKENDS: dict[str, Callable[[Path], MemoryBackend]] = {
    "edge": lambda d: EdgeBackend(d / "edge"),
    "qdrant-local": lambda d: QdrantBackend("memories", path=str(d / "qdrant-local")),
}
TENANTS = frozenset({"default", "acme", "globex", "initech"})


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=sorted(BACKENDS))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., MemoryStore]:
    def make(**kw: object) -> MemoryStore:
        options: dict[str, object] = {"tenants": TENANTS, **kw}
        embedder = options.pop("embedder", HashEmbedder(256))
        return MemoryStore(BACKENDS[request.param](tmp_path), embedder, **options)  # type: ignore[arg-type]

    make.backend = request.param  # type: ignore[attr-defined]
    return make


@pytest.fixture
async def store(make_store: Callable[..., MemoryStore]) -> AsyncIterator[MemoryStore]:
    clock = Clock()
    s = await make_store(clock=clock).open()
    s.test_clock = clock  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        await s.close()


def origin(n: int = 0, agent: str = "tester", conversation: str = "c1") -> Origin:
    return Origin(agent=agent, message_id=f"m{n}", trace_id=f"{n:032x}", conversation=conversation)


async def test_known_answer_recall_hit_at_k(store: MemoryStore, make_store: object) -> None:
    ids: dict[str, str] = {}
    for n, (token, fact, _) in enumerate(FACTS):
        ids[token] = (await store.remember(f"{token}: {fact}", tenant="default", origin=origin(n))).id
    for n, text in enumerate(distractors(200)):
        await store.remember(text, tenant="default", origin=origin(1000 + n), kind="episode")

    def hit_at(results: list[list[str]], want: list[str], k: int) -> float:
        return sum(w in r[:k] for r, w in zip(results, want, strict=True)) / len(want)

    want = [ids[token] for token, _, _ in FACTS]
    report = {}
    for label, queries in (
        ("paraphrase", [q for _, _, q in FACTS]),
        ("exact id", [token for token, _, _ in FACTS]),
    ):
        results = []
        for q in queries:
            found, mode = await store.recall(q, tenant="default", k=5)
            assert mode == "hybrid"
            results.append([f.id for f in found])
        report[label] = {k: hit_at(results, want, k) for k in (1, 3, 5)}
    backend = getattr(make_store, "backend", "?")
    for label, scores in report.items():
        print(
            f"\nrecall[{backend}] {label}: {len(FACTS)} facts + 200 distractors: "
            + ", ".join(f"hit@{k}={v:.2f}" for k, v in scores.items())
        )
    assert report["exact id"][1] >= 0.95
    assert report["paraphrase"][5] >= 0.8
    assert report["paraphrase"][1] >= 0.6


async def test_no_cross_tenant_result_in_randomized_queries(store: MemoryStore, make_store: object) -> None:
    rng = random.Random(42)
    rounds = 3000 if getattr(make_store, "backend", "") == "edge" else 400  # local mode scans: slower
    tenants = sorted(TENANTS)
    owner: dict[str, str] = {}
    vocab = distractors(200, seed=3)
    for n, text in enumerate(vocab):
        tenant = tenants[n % len(tenants)]
        kind = rng.choice(["fact", "episode", "entity"])
        done = await store.remember(text, tenant=tenant, origin=origin(n, agent=f"a{n % 3}"), kind=kind)
        owner[done.id] = tenant
    queries = 0
    hits = 0
    for _ in range(rounds):
        tenant = rng.choice(tenants)
        words = " ".join(rng.sample(rng.choice(vocab).split(), 4))
        where: dict[str, object] = rng.choice(
            [{}, {"kind": ["fact", "entity"]}, {"agent": "a1"}, {"before": 1.8e9}, {"kind": "episode"}]
        )
        found, _ = await store.recall(
            words,
            tenant=tenant,
            k=rng.choice([1, 5, 20]),
            where=where,
            mode=rng.choice(["hybrid", "dense", "keyword"]),
        )
        queries += 1
        hits += len(found)
        foreign = [f.id for f in found if owner[f.id] != tenant or f.payload["tenant"] != tenant]
        assert not foreign, f"tenant {tenant} saw {foreign}"
    print(f"\ntenant isolation: {queries} randomized queries, {hits} results, 0 from another tenant")
    assert hits > queries  # the queries did find things: the check was not vacuous


async def test_near_duplicates_merge_with_provenance(store: MemoryStore) -> None:
    first = await store.remember(
        "Ada prefers phone calls in the morning.", tenant="default", origin=origin(1, "a")
    )
    again = await store.remember(
        "Ada prefers phone calls in the morning!", tenant="default", origin=origin(2, "b")
    )
    same = await store.remember(
        "Ada prefers phone calls in the morning!", tenant="default", origin=origin(2, "b")
    )
    other = await store.remember("Grace runs the navy team.", tenant="default", origin=origin(3))
    assert (again.id, again.merged, again.seen) == (first.id, True, 2)
    assert (same.id, same.seen) == (first.id, 2)  # the same request again is not counted twice
    assert other.id != first.id and not other.merged
    [top, *_] = (await store.recall("Ada phone", tenant="default", k=2))[0]
    assert top.id == first.id
    assert top.payload["seen"] == 2
    assert [s["agent"] for s in top.payload["sources"]] == ["a", "b"]
    assert top.payload["message_id"] == "m1" and top.payload["trace_id"] == f"{1:032x}"
    # another kind or namespace is another scope: no merge
    ns = await store.remember(
        "Ada prefers phone calls in the morning.", tenant="default", origin=origin(4), namespace="crm"
    )
    assert ns.id != first.id and not ns.merged


async def test_ttl_hides_then_sweeps_expired_memories(store: MemoryStore) -> None:
    clock: Clock = store.test_clock  # type: ignore[attr-defined]
    await store.remember("The staging password rotates today.", tenant="default", origin=origin(1), ttl=60)
    await store.remember("The staging server is in Frankfurt.", tenant="default", origin=origin(2))
    found, _ = await store.recall("staging", tenant="default", k=5)
    assert len(found) == 2
    clock.now += 61
    found, _ = await store.recall("staging", tenant="default", k=5)
    assert [f.payload["text"] for f in found] == ["The staging server is in Frankfurt."]
    assert await store.sweep() == 1
    assert await store.sweep() == 0


async def test_forget_by_filter_and_id_stays_in_the_tenant(store: MemoryStore) -> None:
    a = await store.remember("acme fact one", tenant="acme", origin=origin(1, conversation="x"))
    await store.remember("acme fact two", tenant="acme", origin=origin(2, conversation="y"))
    g = await store.remember("globex fact one", tenant="globex", origin=origin(3, conversation="x"))
    assert await store.forget(tenant="acme", where={"conversation": "x"}) == 1
    assert await store.forget(tenant="acme", ids=[g.id]) == 0  # another tenant's id: untouched
    assert await store.forget(tenant="acme", ids=[a.id]) == 0  # already gone
    left, _ = await store.recall("fact", tenant="acme", k=10)
    assert [f.payload["text"] for f in left] == ["acme fact two"]
    assert len((await store.recall("fact", tenant="globex", k=10))[0]) == 1


BAD_INPUT: list[tuple[Callable[[MemoryStore], Awaitable[object]], str]] = [
    (lambda s: s.remember("x" * 9000, tenant="default", origin=origin()), "oversize"),
    (lambda s: s.recall("q" * 9000, tenant="default"), "oversize"),
    (lambda s: s.remember("v", tenant="default", origin=origin(), vector=[0.1] * 3), "dimension"),
    (lambda s: s.recall("v", tenant="default", vector=[float("nan")] * 256), "dimension"),
    (lambda s: s.remember("t", tenant="umbrella", origin=origin()), "unknown_tenant"),
    (lambda s: s.recall("t", tenant="umbrella"), "unknown_tenant"),
    (lambda s: s.recall("t", tenant="default", where={"tenant": "acme"}), "bad_filter"),
    (lambda s: s.recall("t", tenant="default", where={"kind": 3}), "bad_filter"),
    (lambda s: s.recall("t", tenant="default", where={"after": "yesterday"}), "bad_filter"),
    (lambda s: s.recall("t", tenant="default", where=["kind"]), "bad_filter"),
    (lambda s: s.recall("t", tenant="default", k=0), "invalid"),
    (lambda s: s.recall("t", tenant="default", mode="psychic"), "invalid"),
    (lambda s: s.remember("t", tenant="default", origin=origin(), kind="Bad Kind"), "invalid"),
    (lambda s: s.remember("   ", tenant="default", origin=origin()), "invalid"),
    (lambda s: s.remember("t", tenant="default", origin=origin(), ttl=-1), "invalid"),
    (lambda s: s.forget(tenant="default"), "invalid"),
    (lambda s: s.forget(tenant="default", ids=["not-a-uuid"]), "invalid"),
    (lambda s: s.recall("t", tenant="default", namespace="_working"), "invalid"),
]


async def test_bad_input_is_refused_with_a_kind(store: MemoryStore) -> None:
    for n, (call, kind) in enumerate(BAD_INPUT):
        with pytest.raises(MemoryRefused) as caught:
            await call(store)
        assert caught.value.kind == kind, (n, caught.value.reason)
    # and the store still works
    await store.remember("still fine", tenant="default", origin=origin(99))
    assert (await store.recall("still fine", tenant="default", k=1))[0]


async def test_writes_survive_reopening(make_store: Callable[..., MemoryStore]) -> None:
    first = await make_store().open()
    written = [
        (await first.remember(f"{token}: {fact}", tenant="acme", origin=origin(n))).id
        for n, (token, fact, _) in enumerate(FACTS[:10])
    ]
    await first.close()
    again = await make_store().open()
    try:
        found, _ = await again.recall(FACTS[3][0], tenant="acme", k=3)
        assert found[0].id == written[3]
        assert sorted(
            f.id for f in (await again.recall("the", tenant="acme", k=50, mode="dense"))[0]
        ) == sorted(written)
    finally:
        await again.close()


async def test_an_embedder_mismatch_is_a_clear_error(make_store: Callable[..., MemoryStore]) -> None:
    first = await make_store().open()
    await first.remember("anything", tenant="default", origin=origin())
    await first.close()
    other = make_store(embedder=HashEmbedder(128))
    with pytest.raises(ConfigError, match=r"hash-v1-256.*hash-v1-128"):
        await other.open()
    await other.close()
