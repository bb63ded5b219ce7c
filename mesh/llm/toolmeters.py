"""OpenTelemetry metrics of tool runs (docs/operations.md#metrics): calls by outcome, errors
by kind, and run time, per agent and tool. A result given again from the journal is not a
run and is not counted (mesh.llm.journal)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from opentelemetry import metrics

from mesh.llm.metering import current_scope

AGENT, TOOL, OUTCOME, KIND = "mesh.agent", "mesh.tool", "outcome", "error.type"
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ToolMeters:
    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("mesh.llm.tools")
        self.calls = meter.create_counter(
            "mesh.tool.calls", unit="{call}", description="Tool runs by outcome (ok or the error kind)"
        )
        self.errors = meter.create_counter(
            "mesh.tool.errors", unit="{call}", description="Tool runs that failed, by kind"
        )
        self.duration = meter.create_histogram(
            "mesh.tool.duration",
            unit="s",
            description="Tool run time",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )

    @contextlib.contextmanager
    def measured(self, tool: str) -> Iterator[None]:
        """Count the run in the block as one call of `tool`, failed if it raises (the kind of
        a ToolError, else the exception's name)."""
        attrs = {AGENT: current_scope().agent, TOOL: tool}
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except Exception as exc:
            outcome = str(getattr(exc, "kind", "") or type(exc).__name__)
            self.errors.add(1, {**attrs, KIND: outcome})
            raise
        finally:
            self.duration.record(time.perf_counter() - started, attrs)
            self.calls.add(1, {**attrs, OUTCOME: outcome})


_meters: ToolMeters | None = None


def tool_meters() -> ToolMeters:
    """The process's tool meters, made on first use from the global meter provider."""
    global _meters
    if _meters is None:
        _meters = ToolMeters()
    return _meters
