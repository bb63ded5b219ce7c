"""W2 pipeline: events through stage A -> B -> C (each appends a marker and hands off over
its direct line) and back to the driver."""

from __future__ import annotations

from benchmarks.workloads import Mode, Phase, System, Target, Workload, latency, throughput

COUNTS = {"smoke": (40, 20), "quick": (1500, 200), "full": (5000, 500)}


def services(system: System) -> list[str]:
    return ["stage_a", "stage_b", "stage_c"] if system.kind == "mesh" else ["stage-a", "stage-b", "stage-c"]


def phases(mode: Mode) -> list[Phase]:
    loaded, unloaded = COUNTS[mode]
    return [
        Phase(
            "64 in flight",
            {"cmd": "concurrent", "n": loaded, "inflight": 64},
            throughput(
                "W2 pipeline",
                "events/s",
                "event",
                Target("mesh", 0.5, "higher"),
                Target("mesh-sampled", 0.7, "higher"),
            ),
        ),
        Phase(
            "1 in flight",
            {"cmd": "serial", "n": unloaded},
            latency("W2 1 in flight", "event", Target("mesh", 1.3, "lower")),
        ),
    ]


WORKLOAD = Workload("pipeline", "W2 pipeline (3 handoffs, direct lines)", services, phases)
