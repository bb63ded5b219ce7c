"""One real nats-server per test session, on a free loopback port with a temporary store."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.runtime.client import MeshClient
from mesh.testing import nats_server
from mesh.transport.server import EmbeddedServer
from mesh.wire.settings import Settings

HERE = Path(__file__).parent
SAMPLES = HERE / "sample_agents"
sys.path.insert(0, str(HERE))


@pytest.fixture(scope="session", autouse=True)
def spans() -> InMemorySpanExporter:
    """The real OpenTelemetry SDK for in-process agents; spans are kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    with nats_server(tmp_path_factory.mktemp("nats")) as srv:
        yield srv


@pytest.fixture
def settings(server: EmbeddedServer, tmp_path: Path) -> Settings:
    return Settings.load(
        environ={},
        nats_url=server.url,
        data_dir=tmp_path / "data",
        trace_exporter="none",
        log_level="warning",
        # retries and redeliveries in test time
        max_deliver=3,
        retry_backoff=0.05,
        retry_backoff_max=0.2,
        ack_wait=5.0,
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[MeshClient]:
    c = await MeshClient.connect(settings, "test-client")
    try:
        yield c
    finally:
        await c.close()
