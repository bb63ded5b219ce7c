"""The backlog of an agent's consumers as metrics (docs/operations.md#metrics): how many
stored messages wait for the agent, and how many it holds unacknowledged.

- ``mesh.consumer.pending`` (gauge): messages in the consumer's stream not yet delivered;
- ``mesh.consumer.ack_pending`` (gauge): delivered and not yet acknowledged (being handled,
  or held by a replica that died, until MESH_ACK_WAIT hands them out again).

Their sum is what KEDA's ``nats-jetstream`` trigger scales on (docs/deploy.md). The numbers
come from the server's consumer info, read every `EVERY` seconds by a task of the agent
process; a scrape reports the last reading and never waits for the server. Every replica
of an agent reports the same consumers: aggregate with ``max``, not ``sum``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING, Final

import structlog
from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from mesh.runtime.metered import AGENT, enabled

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

    from mesh.transport.base import Transport
    from mesh.transport.streams import ConsumerSpec

EVERY: Final = 15.0  # seconds between readings: a Prometheus scrape interval
STREAM, CONSUMER = "mesh.stream", "mesh.consumer"
log = structlog.get_logger("mesh.metrics")


class Backlog:
    """The gauges of one agent process's consumers, fed by `run`."""

    def __init__(
        self,
        transport: Transport,
        agent: str,
        consumers: Iterable[ConsumerSpec],
        meter_provider: MeterProvider | None = None,
    ) -> None:
        self.transport = transport
        self.agent = agent
        self.consumers = [(c.stream, c.name) for c in consumers]
        # the last reading of each consumer: (pending, ack pending); none until it is read
        self.readings: dict[tuple[str, str], tuple[int, int]] = {}
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("mesh.runtime")
        meter.create_observable_gauge(
            "mesh.consumer.pending",
            callbacks=[self._pending],
            unit="{message}",
            description="Stored messages not yet delivered to the agent, by consumer",
        )
        meter.create_observable_gauge(
            "mesh.consumer.ack_pending",
            callbacks=[self._ack_pending],
            unit="{message}",
            description="Messages delivered to the agent and not yet acknowledged, by consumer",
        )

    async def read(self) -> None:
        """Ask the server for each consumer's numbers once; a consumer that cannot be read
        keeps its last reading (and the failure is logged at debug)."""
        for stream, name in self.consumers:
            try:
                info = await self.transport.consumer_info(stream, name)
            except Exception as exc:  # a failover, a consumer not made yet: read it next time
                log.debug("consumer info not read", stream=stream, consumer=name, error=str(exc))
                continue
            self.readings[(stream, name)] = (int(info.num_pending or 0), int(info.num_ack_pending or 0))

    async def run(self, every: float = EVERY) -> None:
        while True:
            await self.read()
            await asyncio.sleep(every)

    def _observations(self, index: int) -> Iterable[Observation]:
        for (stream, name), numbers in list(self.readings.items()):
            yield Observation(numbers[index], {AGENT: self.agent, STREAM: stream, CONSUMER: name})

    def _pending(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observations(0)

    def _ack_pending(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observations(1)


def watch(transport: Transport, agent: str, consumers: Iterable[ConsumerSpec]) -> asyncio.Task[None] | None:
    """Read the consumers' backlog in the background (cancel the task to stop), when this
    process exports metrics; nothing otherwise."""
    if not enabled():
        return None
    return asyncio.create_task(Backlog(transport, agent, consumers).run())
