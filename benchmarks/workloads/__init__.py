"""The workload registry: what each workload starts, on which systems, and what it measures.

A workload names the services each system runs (each one an OS process), the driver it is
loaded with, and its phases: a driver command and the metrics read from its answer, with
the targets that apply (as ratios to the raw floor of the same run). Adding a workload is
adding a `Workload` to `REGISTRY` (the memory workload plugs in here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["smoke", "quick", "full"]


@dataclass(frozen=True)
class System:
    """One way of running a workload: the raw floor, or the mesh in one configuration."""

    key: str  # "raw", "mesh", "mesh-sampled"
    label: str  # the table column
    kind: Literal["raw", "mesh"]
    suffix: str  # appended to agent names and raw subjects, so systems run side by side
    env: dict[str, str] = field(default_factory=dict)  # for the mesh processes


RAW = System("raw", "raw nats-py", "raw", "")
MESH = System("mesh", "mesh (100% traced)", "mesh", "", {"MESH_TRACE_SAMPLE": "1.0"})
MESH_SAMPLED = System("mesh-sampled", "mesh (10% sampled)", "mesh", "-s", {"MESH_TRACE_SAMPLE": "0.1"})
SYSTEMS = {s.key: s for s in (RAW, MESH, MESH_SAMPLED)}


@dataclass(frozen=True)
class Target:
    """``value / raw`` must be at most (``lower``) or at least (``higher``) ``ratio``."""

    system: str
    ratio: float
    better: Literal["lower", "higher"]

    def met(self, ratio: float) -> bool:
        return ratio <= self.ratio if self.better == "lower" else ratio >= self.ratio

    def __str__(self) -> str:
        return f"{'<=' if self.better == 'lower' else '>='} {self.ratio:g}x"


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
    services: Callable[[System], list[str]]  # mesh: agent attributes; raw: roles
    phases: Callable[[Mode], list[Phase]]
    systems: tuple[str, ...] = ("raw", "mesh", "mesh-sampled")
    warmup: int = 200
    mesh_env: dict[str, str] = field(default_factory=dict)  # e.g. durable handoffs


def latency(name: str, unit_name: str, p50: Target | None = None) -> tuple[Metric, ...]:
    return (
        Metric("p50_us", f"{name} p50", "µs", (p50,) if p50 else ()),
        Metric("p99_us", f"{name} p99", "µs"),
        Metric("cpu_us", f"{name} CPU/{unit_name}", "µs"),
    )


def throughput(name: str, unit: str, unit_name: str, *targets: Target) -> tuple[Metric, ...]:
    return (
        Metric("rate", name, unit, targets),
        Metric("p50_us", f"{name} p50", "µs"),
        Metric("p99_us", f"{name} p99", "µs"),
        Metric("cpu_us", f"{name} CPU/{unit_name}", "µs"),
    )


def _registry() -> dict[str, Workload]:
    from benchmarks.workloads import durable, fanout, hop, pipeline

    chosen = (hop.WORKLOAD, pipeline.WORKLOAD, fanout.WORKLOAD, durable.WORKLOAD, fanout.JOIN_WORKLOAD)
    return {w.key: w for w in chosen}


REGISTRY: dict[str, Workload] = _registry()
