"""Run the workloads, mesh and raw floor interleaved, print a table, write bench-results.json.

    python -m benchmarks [--quick | --smoke] [--only hop,pipeline] [--rounds N] [--output PATH]

One nats-server (embedded, loopback, in a temporary directory) serves the whole run. For
each workload every system's processes start, then the phases run in rounds, each round
visiting the systems in a rotated order, so the mesh and its floor share the machine's
state (other load, CPU frequency) as closely as a shared machine allows. The value kept
is the median over rounds; ratios are to the raw floor's median of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks import memory as memory_bench
from benchmarks.harness import ROOT, Group, cpu_seconds
from benchmarks.workloads import REGISTRY, SYSTEMS, Mode, Workload
from mesh import server as srv

ROUNDS: dict[Mode, int] = {"smoke": 1, "quick": 1, "full": 3}
Echo = Callable[[str], None]


def _print(line: str) -> None:
    print(line, flush=True)


def run_workload(
    wl: Workload, mode: Mode, rounds: int, url: str, server_pid: int, work: Path, echo: Echo
) -> list[dict[str, Any]]:
    groups = {key: Group(wl, SYSTEMS[key], url, work) for key in wl.systems}
    phases = wl.phases(mode)
    samples: dict[tuple[str, str], list[dict[str, Any]]] = {}
    started = time.monotonic()
    try:
        for g in groups.values():
            g.start()
        for key, g in groups.items():
            if not g.command({"cmd": "ready", "timeout": 90}, timeout=120).get("ready"):
                raise RuntimeError(f"{wl.key} on {key} never answered; logs in {g.logs}")
        for g in groups.values():  # warm up: imports, caches, connections, JIT-free paths
            g.command({"cmd": "serial", "n": wl.warmup if mode != "smoke" else 5})
        echo(f"  {wl.title}: ready in {time.monotonic() - started:.1f}s")
        keys = list(groups)
        for r in range(rounds):
            order = keys[r % len(keys) :] + keys[: r % len(keys)]
            for phase in phases:
                for key in order:
                    g = groups[key]
                    pids = [*g.pids, server_pid]
                    before = cpu_seconds(pids)
                    result = g.command(phase.command)
                    spent = cpu_seconds(pids) - before
                    result["cpu_us"] = spent / max(1, result["n"]) * 1e6
                    samples.setdefault((phase.name, key), []).append(result)
    finally:
        for g in groups.values():
            g.stop()
    echo(f"  {wl.title}: done in {time.monotonic() - started:.1f}s")
    return _records(wl, phases, samples, keys)


def _records(
    wl: Workload, phases: list[Any], samples: dict[tuple[str, str], list[dict[str, Any]]], keys: list[str]
) -> list[dict[str, Any]]:
    out = []
    for phase in phases:
        for metric in phase.metrics:
            floor = statistics.median(s[metric.key] for s in samples[(phase.name, "raw")])
            for key in keys:
                runs = samples[(phase.name, key)]
                value = statistics.median(s[metric.key] for s in runs)
                ratio = value / floor if floor else None
                target = next((t for t in metric.targets if t.system == key), None)
                out.append(
                    {
                        "workload": wl.key,
                        "system": key,
                        "name": metric.name,
                        "phase": phase.name,
                        "metric": metric.key,
                        "value": round(value, 3),
                        "unit": metric.unit,
                        "ratio": round(ratio, 3) if ratio is not None else None,
                        "target": str(target) if target else None,
                        "met": target.met(ratio) if target and ratio is not None else None,
                        "rounds": [round(s[metric.key], 3) for s in runs],
                        "errors": sum(int(s.get("errors", 0)) for s in runs),
                    }
                )
    return out


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nats_server = subprocess.run(
            [str(srv.binary()), "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except Exception:
        nats_server = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": nats_server,
        "nats_py": metadata.version("nats-py"),
        "msgspec": metadata.version("msgspec"),
        "opentelemetry_sdk": metadata.version("opentelemetry-sdk"),
        "load_before": os.getloadavg()[0],
    }


def run_bench(
    mode: Mode = "full",
    *,
    only: list[str] | None = None,
    rounds: int | None = None,
    output: Path | None = ROOT / "bench-results.json",
    echo: Echo = _print,
) -> dict[str, Any]:
    """Run the selected workloads; returns (and writes to `output`) the results document."""
    chosen = [REGISTRY[k] for k in (only or list(REGISTRY)) if k != "memory"]
    rounds = rounds or ROUNDS[mode]
    started = time.monotonic()
    info = machine()
    echo(f"mesh bench: {mode}, {rounds} round(s), {info['cores']} cores ({info['cpu']})")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-") as tmp:
        work = Path(tmp)
        server = srv.EmbeddedServer(work / "server")
        server.start()
        try:
            assert server.info is not None
            for wl in chosen:
                records += run_workload(wl, mode, rounds, server.url, server.info.pid, work, echo)
            if only is None or "memory" in only:
                echo("memory: remember/recall through the mesh vs the store called directly")
                records += asyncio.run(memory_bench.bench_records(mode, server.url, work / "memory"))
        finally:
            server.stop()
    meta = {
        **info,
        "mode": mode,
        "rounds": rounds,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 1),
    }
    doc = {"meta": meta, "results": records}
    echo(table(records))
    echo(f"finished in {meta['seconds']}s")
    if output is not None:
        output.write_text(json.dumps(doc, indent=2) + "\n")
        echo(f"wrote {output}")
    return doc


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}"


def table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per metric, one column per system, ratios to the raw floor."""
    systems = [k for k in SYSTEMS if any(r["system"] == k for r in records)]
    head = ["workload", "metric", *(SYSTEMS[k].label for k in systems), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in records:
        rows.setdefault((r["workload"], r["name"]), {})[r["system"]] = r
    for (wl, name), by_system in rows.items():
        title = REGISTRY[wl].title if wl in REGISTRY else "Memory (floor: the store called directly)"
        cells = [title, f"{name} ({by_system['raw']['unit']})"]
        verdicts = []
        for k in systems:
            if k not in by_system:
                cells.append("")
                continue
            r = by_system[k]
            cell = _fmt(r["value"])
            if k != "raw" and r["ratio"] is not None:
                cell += f" ({r['ratio']:.2f}x)"
            if r["errors"]:
                cell += f" [{r['errors']} errors]"
            cells.append(cell)
            if r["target"]:
                verdicts.append(f"{r['target']} {'met' if r['met'] else 'MISSED'}")
        cells.append("; ".join(verdicts))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--quick", action="store_true", help="Smaller counts, one round (under a minute).")
    how.add_argument("--smoke", action="store_true", help="Tiny counts: checks the harness only.")
    parser.add_argument(
        "--only", default="", help=f"Comma-separated workloads: {', '.join(REGISTRY)}, memory."
    )
    parser.add_argument("--rounds", type=int, default=0, help="Rounds per phase (default: 1 quick, 3 full).")
    parser.add_argument("--output", default=str(ROOT / "bench-results.json"), help="Where the JSON goes.")
    args = parser.parse_args(argv)
    mode: Mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    only = [k.strip() for k in args.only.split(",") if k.strip()] or None
    unknown = [k for k in only or [] if k not in REGISTRY and k != "memory"]
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    run_bench(mode, only=only, rounds=args.rounds or None, output=Path(args.output))
    sys.exit(0)
