"""The benchmark harness, so it cannot rot. Nothing here is timed: the numbers of a smoke
run mean nothing, and the targets are reported by `make bench`, never asserted.

The default run has the tiny smoke (one workload, one system of each kind, a few seconds);
every workload on every system is `pytest -m bench tests/test_bench.py` (a minute or two).
FastStream is a bench-only extra: without it its system is skipped with a note."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import cpu_seconds, process_tree  # noqa: E402
from benchmarks.run import (  # noqa: E402
    SMOKE,
    check_targets,
    faststream_missing,
    headline,
    report,
    run_bench,
    security,
)
from benchmarks.workloads import REGISTRY, SYSTEMS  # noqa: E402


def _check_run(
    doc: dict[str, Any], out: Path, lines: list[str], workloads: list[str], systems: list[str]
) -> None:
    assert json.loads(out.read_text()) == doc
    missing = faststream_missing()
    if missing:
        print(f"\nFastStream skipped: {missing}")
        assert doc["meta"]["skipped"] == {"faststream": missing}
        assert any("FastStream is not installed" in line for line in lines)
    records = [r for r in doc["results"] if r["workload"] != "memory"]
    for key in workloads:
        wl = REGISTRY[key]
        expected = {k for k in wl.systems if k in systems and not (missing and k == "faststream")}
        for phase in wl.phases("smoke"):
            for metric in phase.metrics:
                got = {r["system"] for r in records if r["workload"] == key and r["name"] == metric.name}
                assert got == expected, (key, metric.name, got)
    assert all(r["errors"] == 0 for r in records), [r for r in records if r["errors"]]
    assert all(r["value"] > 0 for r in records if r["metric"] != "cpu_us")
    assert {r["ratio"] for r in records if r["system"] == "raw" and r["value"]} == {1.0}
    assert any("wrote" in line for line in lines) and any("## Headline" in line for line in lines)
    assert doc["meta"]["cores"] and doc["meta"]["nats_server"]


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")  # one worker runs these one after another (Makefile)
def test_smoke_starts_every_kind_of_system(tmp_path: Path) -> None:
    out = tmp_path / "bench-results.json"
    lines: list[str] = []
    doc = run_bench("smoke", output=out, echo=lines.append)
    _check_run(doc, out, lines, *SMOKE)
    assert {SYSTEMS[r["system"]].kind for r in doc["results"]} >= {"raw", "jetstream", "mesh"}
    # the secured mesh ran on its own server, which admits only identities, and is compared
    assert SYSTEMS["mesh-secure"].secure and "mesh-secure" in {r["system"] for r in doc["results"]}
    assert {r["name"] for r in doc["security"]} >= {"W2 pipeline", "W2 pipeline CPU/event"}
    assert any("What security costs" in line for line in lines)
    assert [row["row"] for row in doc["headline"]["rows"]][:2] == [
        "W2 3-stage pipeline, events/s",
        "W2 CPU µs per event (all processes)",
    ]
    assert {t["name"] for t in doc["targets"]} == {"W2 pipeline", "W2 pipeline CPU/event"}


@pytest.mark.bench
def test_every_workload_runs_on_every_system(tmp_path: Path) -> None:
    out = tmp_path / "bench-results.json"
    lines: list[str] = []
    doc = run_bench("smoke", only=[*REGISTRY, "memory"], systems=list(SYSTEMS), output=out, echo=lines.append)
    _check_run(doc, out, lines, list(REGISTRY), list(SYSTEMS))
    memory = [r for r in doc["results"] if r["workload"] == "memory"]
    assert {(r["system"], r["name"]) for r in memory} >= {
        ("raw", "recall p50 @500"),
        ("mesh", "recall p50 @500"),
    }
    assert len(doc["targets"]) == 7 and all(
        t["ratio"] for t in doc["targets"] if t["baseline"] != "faststream"
    )


def _record(workload: str, name: str, system: str, value: float) -> dict[str, Any]:
    return {"workload": workload, "name": name, "system": system, "value": value, "unit": "x", "errors": 0}


def test_targets_are_ratios_between_systems_of_one_run() -> None:
    records = [
        _record("pipeline", "W2 pipeline", "faststream", 1000.0),
        _record("pipeline", "W2 pipeline", "mesh", 1600.0),
        _record("pipeline", "W2 pipeline", "raw-js", 5000.0),
        _record("pipeline", "W2 pipeline CPU/event", "faststream", 1000.0),
        _record("pipeline", "W2 pipeline CPU/event", "mesh", 1100.0),
        _record("hop", "W1 serial p50", "raw", 200.0),
        _record("hop", "W1 serial p50", "mesh", 250.0),
        _record("hop", "W1 serial p50", "mesh-secure", 300.0),
    ]
    by_name = {t["target"]: t for t in check_targets(records, [REGISTRY["pipeline"], REGISTRY["hop"]])}
    assert by_name["W2 pipeline: mesh default >= 1.5x FastStream"]["met"] is True
    assert by_name["W2 pipeline: mesh default >= 0.35x raw JetStream"]["met"] is False  # 0.32x
    assert by_name["W2 pipeline CPU/event: mesh default <= 1x FastStream"]["met"] is False
    assert by_name["W1 serial p50: mesh default <= 1.25x raw core NATS"]["met"] is True  # exactly 1.25x
    not_run = by_name["W2 pipeline: mesh durable=False >= 0.4x raw core NATS"]
    assert not_run["met"] is None and not_run["ratio"] is None
    assert security(records) == [
        {
            "workload": "hop",
            "name": "W1 serial p50",
            "unit": "x",
            "mesh": 250.0,
            "mesh_secure": 300.0,
            "ratio": 1.2,
        }
    ]
    head = headline(records)
    assert head["rows"][0]["values"]["mesh"] == 1600.0 and head["rows"][0]["values"]["raw"] is None
    text = report(
        {
            "meta": {"mode": "smoke", "rounds": 1, "skipped": {}},
            "headline": head,
            "targets": list(by_name.values()),
            "security": security(records),
            "results": [{**r, "ratio": None} for r in records],
        }
    )
    assert "| W1 hop (request/reply) | W1 serial p50 (x) | 250 | 300 | 1.20x |" in text
    assert "| W2 pipeline: mesh default >= 1.5x FastStream | 1.60x (1,600 vs 1,000 events/s) | MET |" in text
    assert "not measured" in text


def test_cpu_seconds_counts_this_process_and_its_children() -> None:
    spent = cpu_seconds([os.getpid()])
    sum(i * i for i in range(300_000))
    assert cpu_seconds([os.getpid()]) > spent
    assert cpu_seconds([2**22 + 12345]) == 0  # a process that is gone counts nothing
    assert process_tree([os.getppid()])[:1] == [os.getppid()] and os.getpid() in process_tree([os.getppid()])
