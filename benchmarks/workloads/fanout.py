"""W3 fan-out/fan-in: a coordinator asks 4 workers at once (four concurrent requests; the
mesh: `ctx.request` over direct lines) and answers with what they all said."""

from __future__ import annotations

from benchmarks.workloads import Metric, Mode, Phase, System, Target, Workload

COUNTS = {"smoke": 5, "quick": 200, "full": 600}


def services(system: System) -> list[str]:
    workers = [f"worker_{i}" if system.kind == "mesh" else f"worker-{i}" for i in range(4)]
    return [*workers, "coordinator"]


def phases(mode: Mode) -> list[Phase]:
    return [
        Phase(
            "serial rounds",
            {"cmd": "serial", "n": COUNTS[mode]},
            (
                Metric("rate", "W3 fan-out rounds", "rounds/s", (Target("mesh", 0.7, "higher"),)),
                Metric("p50_us", "W3 fan-out p50", "µs"),
                Metric("p99_us", "W3 fan-out p99", "µs"),
                Metric("cpu_us", "W3 fan-out CPU/round", "µs"),
            ),
        )
    ]


WORKLOAD = Workload(
    "fanout",
    "W3 fan-out/fan-in (4 workers)",
    services,
    phases,
    systems=("raw", "faststream", "mesh", "mesh-untraced", "mesh-sampled"),
    warmup=100,
)


def join_services(system: System) -> list[str]:
    return [*services(system)[:-1], "join_coordinator" if system.kind == "mesh" else "coordinator"]


def join_phases(mode: Mode) -> list[Phase]:
    return [
        Phase(
            "serial rounds",
            {"cmd": "serial", "n": COUNTS[mode] // 2 or 1},
            (
                Metric("rate", "W3 durable join rounds", "rounds/s"),
                Metric("p50_us", "W3 durable join p50", "µs"),
                Metric("p99_us", "W3 durable join p99", "µs"),
                Metric("cpu_us", "W3 durable join CPU/round", "µs"),
            ),
        )
    ]


# an extra row: ctx.fan_out through a durable join (KV state, JetStream inboxes), against the
# same raw core-NATS fan-out; no target
JOIN_WORKLOAD = Workload(
    "join",
    "W3 fan-out, durable join (extra)",
    join_services,
    join_phases,
    systems=("raw", "mesh"),
    warmup=20,
)
