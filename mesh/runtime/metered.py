"""OpenTelemetry metrics of the deliveries an agent takes (docs/operations.md#metrics).

Two rungs of the delivery ladder (mesh.runtime.ladder) share one `MessageMeters`:

    Measure > Count > Settle > Outcome > ...

`Outcome`, right below `Settle`, sees what the rungs below made of the delivery and writes
it on the `Work` (and counts a handler failure at once); `Settle` changes it to
``escalated`` when it hands the work on. `Measure`, on top, counts the outcome by agent
and message type once the delivery is settled, with the time it took, and keeps the
in-flight count.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from opentelemetry import metrics

from mesh.runtime.ladder import Duplicate, HandlerFailed, Take, Work
from mesh.runtime.outcome import settled_as
from mesh.transport.delivery import Later
from mesh.wire.errors import DeliveryError

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

AGENT, TYPE, OUTCOME, KIND = "mesh.agent", "mesh.message.type", "outcome", "mesh.dead_letter.kind"
UNKNOWN = "unknown"  # a delivery refused before it was decoded: its claimed type is not trusted
# seconds: handlers run from a millisecond to MESH_HANDLER_TIMEOUT (300 s by default)
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class MessageMeters:
    """The instruments of one agent process's deliveries."""

    def __init__(self, agent: str, meter_provider: MeterProvider | None = None) -> None:
        self.agent = agent
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("mesh.runtime")
        self.handled = meter.create_counter(
            "mesh.messages.handled", unit="{message}", description="Messages handled and acknowledged"
        )
        self.failed = meter.create_counter(
            "mesh.messages.failed",
            unit="{message}",
            description="Handler runs that raised or ran out of time (each delivery)",
        )
        self.dead_lettered = meter.create_counter(
            "mesh.messages.dead_lettered", unit="{message}", description="Messages dead-lettered, by kind"
        )
        self.escalated = meter.create_counter(
            "mesh.messages.escalated",
            unit="{message}",
            description="Messages that failed their last retry and were handed to a fallback",
        )
        self.redelivered = meter.create_counter(
            "mesh.messages.redelivered", unit="{message}", description="Deliveries that were not the first"
        )
        self.in_flight = meter.create_up_down_counter(
            "mesh.messages.in_flight", unit="{message}", description="Deliveries being handled now"
        )
        self.duration = meter.create_histogram(
            "mesh.handler.duration",
            unit="s",
            description="Time from taking a delivery to settling it, by outcome",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.agent_attrs = {AGENT: agent}

    def failure(self, w: Work) -> None:
        self.failed.add(1, {AGENT: self.agent, TYPE: type_of(w)})

    def settled(self, w: Work, seconds: float) -> None:
        attrs = {AGENT: self.agent, TYPE: type_of(w)}
        outcome = w.outcome or "cancelled"
        if outcome == "handled":
            self.handled.add(1, attrs)
        elif outcome == "dead_lettered":
            self.dead_lettered.add(1, {**attrs, KIND: w.reason or UNKNOWN})
        elif outcome == "escalated":
            self.escalated.add(1, attrs)
        if w.delivery.attempt > 1:
            self.redelivered.add(1, attrs)
        self.duration.record(seconds, {**attrs, OUTCOME: outcome})


def type_of(w: Work) -> str:
    return w.env.type_name if w.env is not None else UNKNOWN


class Outcome:
    """Below `Settle` (or `SettleDirect`): what became of the delivery, on `w.outcome` —
    handled, retried, dead_lettered (with the kind on `w.reason`), duplicate or deferred;
    a failure of the handler is counted here, the rest by `Measure`. `max_deliver` is the
    delivery on which a failed handler is dead-lettered: 1 for a direct message."""

    def __init__(self, below: Take, meters: MessageMeters, max_deliver: int = 1) -> None:
        self.below = below
        self.meters = meters
        self.max_deliver = max_deliver

    async def __call__(self, w: Work) -> Later | None:
        failure: BaseException | None = None
        result: Later | None = None
        try:
            result = await self.below(w)
            return result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            outcome, kind, _ = settled_as(w, failure, result, self.max_deliver)
            if isinstance(failure, HandlerFailed) or (
                isinstance(failure, Exception) and not isinstance(failure, (Duplicate, DeliveryError))
            ):
                self.meters.failure(w)
            if outcome:  # a stop's cancellation is counted as such by `Measure`
                w.outcome, w.reason = _METRIC.get(outcome, outcome), kind


_METRIC = {"retry": "retried", "dead_letter": "dead_lettered"}  # the metrics' words for them


class Measure:
    """The top rung: the in-flight count while a delivery is taken, then its outcome and
    how long it took, by agent and message type."""

    def __init__(self, below: Take, meters: MessageMeters) -> None:
        self.below = below
        self.meters = meters

    async def __call__(self, w: Work) -> Later | None:
        meters = self.meters
        meters.in_flight.add(1, meters.agent_attrs)
        started = time.perf_counter()
        try:
            return await self.below(w)
        finally:
            meters.in_flight.add(-1, meters.agent_attrs)
            meters.settled(w, time.perf_counter() - started)


def metered(
    stored: Take, direct: Take, agent: str, max_deliver: int
) -> tuple[Take, Take, MessageMeters | None]:
    """`Outcome` under both ladders (to go right below their `Settle`), and the meters for
    the `Measure` on top; the ladders unchanged and no meters when this process exports no
    metrics (`enabled`), so an agent without them pays nothing per delivery."""
    if not enabled():
        return stored, direct, None
    meters = MessageMeters(agent)
    return Outcome(stored, meters, max_deliver), Outcome(direct, meters), meters


def measured(top: Take, meters: MessageMeters | None) -> Take:
    """`Measure` on top of a ladder, when there are meters."""
    return top if meters is None else Measure(top, meters)


def enabled() -> bool:
    """Whether this process has a meter provider that keeps what is counted: the SDK's, as
    `mesh.observability.metrics.configure_metrics` (or a test) installs it. Without one
    every instrument is a no-op, and the rungs that feed them are left out."""
    from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider

    return isinstance(metrics.get_meter_provider(), SdkMeterProvider)
