"""Shared-memory latency: remember and recall through the mesh versus the store directly.

    .venv/bin/python -m benchmarks.memory            # 10k and 100k memories
    .venv/bin/python -m benchmarks.memory --quick    # 2k memories, a smoke run

For each size it bulk-loads N memories into the embedded engine (a fresh data dir) and
builds its index, then measures, one request at a time:

* direct: `MemoryStore.remember` / `recall` in this process (embedding + Qdrant engine);
* mesh:   `Memory.remember` / `recall` from a client through a real nats-server to the
          memory service running as its own process (`mesh run mesh.services.memory:agent`)
          on the same data.

The mesh overhead is the difference of the medians. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mesh.agent.launch import spawn_agent, stop_process
from mesh.memory.backend import StoredPoint
from mesh.memory.client import Memory
from mesh.memory.store import NEVER, MemoryStore, Origin, point_id
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import nats_server
from mesh.wire.errors import MemoryRefused
from mesh.wire.settings import Settings

TENANT = "default"


def vocabulary(rng: random.Random, n: int = 3000) -> list[str]:
    consonants, vowels = "bcdfghklmnprstvz", "aeiou"
    return [
        "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 4)))
        for _ in range(n)
    ]


def sentence(rng: random.Random, words: list[str], i: int) -> str:
    return f"Record {i}: " + " ".join(rng.choices(words, k=12)) + f" code R-{i:06d}."


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000,
    }


async def timed(n: int, op: Callable[[int], Awaitable[Any]]) -> list[float]:
    for i in range(min(50, n)):  # warm up
        await op(-1 - i)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        await op(i)
        samples.append(time.perf_counter() - t0)
    return samples


async def load(store: MemoryStore, n: int, rng: random.Random, words: list[str]) -> float:
    """Bulk-load `n` memories straight into the backend (batched embedding, no dedupe)."""
    t0 = time.perf_counter()
    origin = Origin("bench", "load", "0" * 32, "bench")
    for start in range(0, n, 1000):
        texts = [sentence(rng, words, i) for i in range(start, min(n, start + 1000))]
        vectors = store.embedder.embed(texts)
        now = time.time()
        points = [
            StoredPoint(
                point_id(TENANT, "default", "fact", text),
                vector,
                store.keywords.document(text),
                {
                    "tenant": TENANT,
                    "namespace": "default",
                    "kind": "fact",
                    "text": text,
                    **origin.at(now),
                    "expires_at": NEVER,
                    "seen": 1,
                    "sources": [],
                },
            )
            for text, vector in zip(texts, vectors, strict=True)
        ]
        store.backend.upsert(points)
    store.backend.maintain()  # build the HNSW index, as the service's sweeper does
    return time.perf_counter() - t0


async def run_size(n: int, ops: int, root: Path, server_url: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    data = root / f"n{n}"
    settings = Settings.load(
        environ={},
        data_dir=data,
        trace_exporter="none",
        log_level="warning",
        nats_url=server_url,
        insecure=True,  # the benchmarks measure a mesh without identities
    )
    store = await MemoryStore.from_settings(settings).open()
    load_s = await load(store, n, rng, words)
    queries = [" ".join(rng.choices(words, k=3)) for _ in range(ops + 50)]
    origin = Origin("bench", "direct", "0" * 32, "bench")
    result: dict[str, Any] = {"memories": n, "load_s": round(load_s, 1), "ops": ops}
    result["direct_recall"] = percentiles(
        await timed(ops, lambda i: store.recall(queries[i], tenant=TENANT, k=5))
    )
    result["direct_remember"] = percentiles(
        await timed(ops, lambda i: store.remember(f"direct {i} " + queries[i], tenant=TENANT, origin=origin))
    )
    await store.close()

    log = root / f"memory-service-{n}.log"
    proc = spawn_agent(
        "mesh.services.memory:agent",
        url=server_url,
        data_dir=data,
        log=log,
        env={"MESH_TRACE_EXPORTER": "none", "MESH_LOG_LEVEL": "warning", "MESH_INSECURE": "true"},
    )
    try:
        async with await MeshClient.connect(settings, "bench") as client:
            await wait_for_agents(client.transport, {"memory": 1}, timeout=60)
            memory = Memory(client, settings.model_copy(update={"memory_timeout": 10.0}))
            result["mesh_recall"] = percentiles(await timed(ops, lambda i: memory.recall(queries[i], k=5)))
            result["mesh_remember"] = percentiles(
                await timed(ops, lambda i: memory.remember(f"mesh {i} " + queries[i]))
            )
            # the floor: a full mesh round trip the service refuses before any store work
            result["mesh_round_trip"] = percentiles(await timed(ops, lambda i: refused(memory)))
    finally:
        stop_process(proc)
    for op in ("recall", "remember"):
        result[f"overhead_{op}_p50_ms"] = result[f"mesh_{op}"]["p50_ms"] - result[f"direct_{op}"]["p50_ms"]
    return result


async def refused(memory: Memory) -> None:
    try:
        await memory.recall("q", k=0)
    except MemoryRefused:
        return
    raise AssertionError("k=0 was not refused")


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'memories':>9}  {'op':<9} {'direct p50':>10} {'direct p99':>10} {'mesh p50':>9} {'mesh p99':>9} "
        f"{'overhead p50':>12}",
    ]
    for r in results:
        for op in ("remember", "recall"):
            d, m = r[f"direct_{op}"], r[f"mesh_{op}"]
            lines.append(
                f"{r['memories']:>9}  {op:<9} {d['p50_ms']:>8.2f}ms {d['p99_ms']:>8.2f}ms "
                f"{m['p50_ms']:>7.2f}ms {m['p99_ms']:>7.2f}ms {r[f'overhead_{op}_p50_ms']:>10.2f}ms"
            )
        rt = r["mesh_round_trip"]
        lines.append(
            f"{r['memories']:>9}  {'refused':<9} {'':>10} {'':>10} "
            f"{rt['p50_ms']:>7.2f}ms {rt['p99_ms']:>7.2f}ms   (mesh round trip, no store work)"
        )
    return "\n".join(lines)


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2k memories, 200 operations: a smoke run")
    parser.add_argument("--sizes", default="", help="comma-separated sizes (default 10000,100000)")
    parser.add_argument("--ops", type=int, default=0, help="measured operations per kind (default 1000)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s] or ([2000] if args.quick else [10_000, 100_000])
    ops = args.ops or (200 if args.quick else 1000)
    results = []
    with tempfile.TemporaryDirectory(prefix="mesh-memory-bench-") as tmp:
        root = Path(tmp)
        with nats_server(root / "nats") as server:
            for n in sizes:
                print(f"loading {n} memories and measuring {ops} operations of each kind...", flush=True)
                results.append(await run_size(n, ops, root, server.url, seed=n))
    print()
    print(table(results))
    out = args.out or Path(tempfile.gettempdir()) / "mesh-memory-bench.json"
    meta = {"python": sys.version.split()[0], "embedder": "hash-v1-384", "backend": "edge", "k": 5}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nresults written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))


SIZES = {"smoke": ([500], 20), "quick": ([2000], 200), "full": ([10_000, 100_000], 1000)}


async def bench_records(mode: str, server_url: str, root: Path) -> list[dict[str, Any]]:
    """The memory workload as `make bench` records: the backend called directly is the floor
    the mesh is measured against; the target is on the difference (at most 1 ms at p50)."""
    sizes, ops = SIZES[mode]
    out: list[dict[str, Any]] = []
    for n in sizes:
        r = await run_size(n, ops, root, server_url, seed=n)
        size = f"{n // 1000}k" if n >= 1000 else str(n)
        for op in ("remember", "recall"):
            direct, mesh = r[f"direct_{op}"], r[f"mesh_{op}"]
            for q in ("p50", "p99"):
                floor, value = direct[f"{q}_ms"], mesh[f"{q}_ms"]
                name = f"{op} {q} @{size}"
                over = value - floor
                if q == "p50":
                    target, met = "overhead <= 1 ms", over <= 1.0
                    if op == "recall" and n >= 100_000:
                        target, met = f"{target}; recall < 10 ms", met and value < 10.0
                else:
                    target, met = None, None
                common = {
                    "workload": "memory",
                    "name": name,
                    "phase": size,
                    "metric": f"{q}_ms",
                    "unit": "ms",
                }
                out.append(
                    {
                        **common,
                        "system": "raw",
                        "value": round(floor, 3),
                        "ratio": 1.0,
                        "target": None,
                        "met": None,
                        "rounds": [round(floor, 3)],
                        "errors": 0,
                    }
                )
                out.append(
                    {
                        **common,
                        "system": "mesh",
                        "value": round(value, 3),
                        "ratio": round(value / floor, 3) if floor else None,
                        "overhead_ms": round(over, 3),
                        "target": target,
                        "met": met,
                        "rounds": [round(value, 3)],
                        "errors": 0,
                    }
                )
    return out
