"""The workload registry: what each workload starts, on which systems, and what it measures.

A workload names the services each system runs (each one an OS process), the driver it is
loaded with, and its phases: a driver command and the metrics read from its answer, with
the targets that apply (a ratio of one system's value to another's in the same run).
Adding a workload is adding a `Workload` to `REGISTRY` (the memory workload plugs in here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["smoke", "quick", "full"]
Kind = Literal["raw", "jetstream", "faststream", "mesh"]


@dataclass(frozen=True)
class System:
    """One way of running a workload: hand-written nats-py, FastStream, or the mesh in one
    configuration. `kind` picks the services and the driver; `env` goes to mesh processes."""

    key: str
    label: str  # the table column
    kind: Kind
    suffix: str  # appended to agent names and subjects, so systems run side by side
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""  # what runs, for docs and the JSON
    # on the run's second nats-server, which requires authentication as `mesh up` starts it:
    # every agent on its own identity, the driver on the publisher role, every message signed
    secure: bool = False


_TRACED = {"MESH_TRACE_SAMPLE": "1.0"}
RAW = System("raw", "raw core NATS", "raw", "", note="nats-py + msgspec, core NATS, no headers")
RAW_JS = System(
    "raw-js",
    "raw JetStream",
    "jetstream",
    "",
    note="nats-py + msgspec: work-queue stream, durable pull consumers, publish acks, explicit acks",
)
FASTSTREAM = System(
    "faststream",
    "FastStream",
    "faststream",
    "",
    note="FastStream NatsBroker (core NATS), pydantic models, logger off",
)
MESH = System(
    "mesh",
    "mesh default",
    "mesh",
    "",
    {**_TRACED, "BENCH_DURABLE": "1"},
    note="durable sends and handoffs (JetStream inboxes), every trace recorded",
)
MESH_SECURE = System(
    "mesh-secure",
    "mesh default, secured",
    "mesh",
    "",
    {**_TRACED, "BENCH_DURABLE": "1"},
    note="the mesh default on a server requiring authentication (as `mesh up`): every process on "
    "its own NKEY identity, every message signed (Ed25519) and verified, direct messages also "
    "recorded once in MESH_SEEN",
    secure=True,
)
MESH_DIRECT = System(
    "mesh-direct",
    "mesh durable=False",
    "mesh",
    "-d",
    {**_TRACED, "BENCH_DURABLE": "0"},
    note="sends and handoffs over direct lines (core NATS), every trace recorded",
)
MESH_UNTRACED = System(
    "mesh-untraced",
    "mesh durable=False, untraced",
    "mesh",
    "-u",
    {"MESH_TRACE_EXPORTER": "none", "BENCH_DURABLE": "0"},
    note="direct lines, no tracer provider (MESH_TRACE_EXPORTER=none)",
)
MESH_SAMPLED = System(
    "mesh-sampled",
    "mesh default, 10% sampled",
    "mesh",
    "-s",
    {"MESH_TRACE_SAMPLE": "0.1", "BENCH_DURABLE": "1"},
    note="durable, MESH_TRACE_SAMPLE=0.1 (parent-based: 1 new trace in 10)",
)
MESH_UNRECORDED = System(
    "mesh-unrecorded",
    "mesh default, unrecorded",
    "mesh",
    "-r",
    {**_TRACED, "BENCH_DURABLE": "1", "MESH_RECORD": "false"},
    note="the mesh default without the conversation record (MESH_RECORD=false): what recording costs",
)
SYSTEMS = {
    s.key: s
    for s in (
        RAW,
        RAW_JS,
        FASTSTREAM,
        MESH,
        MESH_SECURE,
        MESH_DIRECT,
        MESH_UNTRACED,
        MESH_SAMPLED,
        MESH_UNRECORDED,
    )
}


@dataclass(frozen=True)
class Target:
    """``value(system) / value(baseline)`` must be at most (``lower``) or at least
    (``higher``) ``ratio``, both from the same run. Reported, never asserted."""

    system: str
    ratio: float
    better: Literal["lower", "higher"]
    baseline: str = "raw"

    def met(self, ratio: float) -> bool:
        return ratio <= self.ratio if self.better == "lower" else ratio >= self.ratio

    def __str__(self) -> str:
        sign = "<=" if self.better == "lower" else ">="
        return f"{SYSTEMS[self.system].label} {sign} {self.ratio:g}x {SYSTEMS[self.baseline].label}"


@dataclass(frozen=True)
class Metric:
    key: str  # in the driver's answer: p50_us, p99_us, rate, cpu_us
    name: str
    unit: str
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True)
class Phase:
    name: str
    command: dict[str, Any]
    metrics: tuple[Metric, ...]


@dataclass(frozen=True)
class Workload:
    key: str  # the driver's workload name
    title: str
    services: Callable[[System], list[str]]  # mesh: agent attributes; others: roles
    phases: Callable[[Mode], list[Phase]]
    systems: tuple[str, ...]
    warmup: int = 200


def latency(name: str, unit_name: str, *p50: Target) -> tuple[Metric, ...]:
    return (
        Metric("p50_us", f"{name} p50", "µs", p50),
        Metric("p99_us", f"{name} p99", "µs"),
        Metric("cpu_us", f"{name} CPU/{unit_name}", "µs"),
    )


def throughput(
    name: str, unit: str, unit_name: str, *targets: Target, cpu: tuple[Target, ...] = ()
) -> tuple[Metric, ...]:
    return (
        Metric("rate", name, unit, targets),
        Metric("p50_us", f"{name} p50", "µs"),
        Metric("p99_us", f"{name} p99", "µs"),
        Metric("cpu_us", f"{name} CPU/{unit_name}", "µs", cpu),
    )


def _registry() -> dict[str, Workload]:
    from benchmarks.workloads import fanout, hop, pipeline

    chosen = (pipeline.WORKLOAD, hop.WORKLOAD, fanout.WORKLOAD, fanout.JOIN_WORKLOAD)
    return {w.key: w for w in chosen}


REGISTRY: dict[str, Workload] = _registry()
