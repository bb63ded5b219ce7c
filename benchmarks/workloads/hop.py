"""W1 hop: a typed request to a responder and its typed reply (the mesh: over the agent's
direct line, whatever the durable setting; requests are never stored)."""

from __future__ import annotations

from benchmarks.workloads import Mode, Phase, System, Target, Workload, latency, throughput

COUNTS = {"smoke": (5, 10), "quick": (300, 1500), "full": (1000, 4000)}


def services(system: System) -> list[str]:
    return ["responder"]


def phases(mode: Mode) -> list[Phase]:
    serial, concurrent = COUNTS[mode]
    return [
        Phase(
            "serial",
            {"cmd": "serial", "n": serial},
            latency("W1 serial", "request", Target("mesh", 1.25, "lower")),
        ),
        Phase(
            "c16",
            {"cmd": "concurrent", "n": concurrent, "inflight": 16},
            throughput("W1 concurrency 16", "req/s", "request", Target("mesh", 0.6, "higher")),
        ),
    ]


WORKLOAD = Workload(
    "hop",
    "W1 hop (request/reply)",
    services,
    phases,
    systems=("raw", "faststream", "mesh", "mesh-secure", "mesh-untraced", "mesh-sampled", "mesh-unrecorded"),
)
