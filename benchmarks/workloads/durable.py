"""W2-durable: the pipeline with JetStream inboxes (handoffs stored, acked after handling),
beside a raw JetStream pipeline (work-queue stream, durable consumers, publish with ack)."""

from __future__ import annotations

from benchmarks.workloads import Mode, Phase, System, Target, Workload, throughput

COUNTS = {"smoke": 20, "quick": 1000, "full": 5000}


def services(system: System) -> list[str]:
    if system.kind == "mesh":
        return ["stage_a", "stage_b", "stage_c"]
    return ["js-stage-a", "js-stage-b", "js-stage-c"]


def phases(mode: Mode) -> list[Phase]:
    return [
        Phase(
            "64 in flight",
            {"cmd": "concurrent", "n": COUNTS[mode], "inflight": 64},
            throughput("W2-durable pipeline", "events/s", "event", Target("mesh", 0.6, "higher")),
        )
    ]


WORKLOAD = Workload(
    "durable",
    "W2-durable pipeline (JetStream inboxes)",
    services,
    phases,
    systems=("raw", "mesh"),
    warmup=100,
    mesh_env={"BENCH_DURABLE": "1"},
)
