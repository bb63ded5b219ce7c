"""The benchmark harness on tiny counts, so it cannot rot: every workload starts its
processes on every system, runs its phases and yields one record per metric and system.
Nothing here is timed: the numbers of a smoke run mean nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import cpu_seconds  # noqa: E402
from benchmarks.run import run_bench, table  # noqa: E402
from benchmarks.workloads import REGISTRY  # noqa: E402

pytestmark = pytest.mark.slow


def test_every_workload_runs_on_every_system(tmp_path: Path) -> None:
    out = tmp_path / "bench-results.json"
    lines: list[str] = []
    doc = run_bench("smoke", output=out, echo=lines.append)
    assert json.loads(out.read_text()) == doc
    records = doc["results"]
    for wl in REGISTRY.values():
        for phase in wl.phases("smoke"):
            for metric in phase.metrics:
                got = {r["system"] for r in records if r["workload"] == wl.key and r["name"] == metric.name}
                assert got == set(wl.systems), (wl.key, metric.name, got)
    assert all(r["errors"] == 0 for r in records), [r for r in records if r["errors"]]
    assert all(r["value"] > 0 for r in records if r["metric"] != "cpu_us")
    assert {r["ratio"] for r in records if r["system"] == "raw" and r["value"]} == {1.0}
    assert "| W1 hop" in table(records) and any("wrote" in line for line in lines)
    memory = [r for r in records if r["workload"] == "memory"]
    assert {(r["system"], r["name"]) for r in memory} >= {
        ("raw", "recall p50 @500"),
        ("mesh", "recall p50 @500"),
    }
    assert doc["meta"]["cores"] and doc["meta"]["nats_server"]


def test_cpu_seconds_counts_this_process() -> None:
    import os

    spent = cpu_seconds([os.getpid()])
    sum(i * i for i in range(300_000))
    assert cpu_seconds([os.getpid()]) > spent
    assert cpu_seconds([2**22 + 12345]) == 0  # a process that is gone counts nothing
