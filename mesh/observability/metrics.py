"""Where this process's OpenTelemetry metrics go: OTLP, the console, and a Prometheus scrape
endpoint (``MESH_METRICS_PORT``). docs/operations.md#metrics lists the metrics.

The instruments are made through the API's global meter provider, wherever they are
created (mesh.runtime.metered, mesh.llm.metering, mesh.llm.toolmeters,
mesh.services.memory); `configure_metrics` installs the SDK provider that gives them
readers. With no reader nothing is installed and every instrument is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mesh.wire.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricReader
    from prometheus_client import CollectorRegistry

    from mesh.wire.settings import Settings

OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def metrics_exporter_kind(settings: Settings, environ: dict[str, str] | None = None) -> str:
    """Where metrics are pushed: ``otlp`` when an OTLP endpoint is set (or spans go by OTLP),
    ``console`` beside console spans, else ``none`` (a scrape endpoint may still serve them).
    OTEL_METRICS_EXPORTER=none turns the push off."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_METRICS_EXPORTER", "").strip().lower() == "none":
        return "none"
    if settings.trace_exporter == "console":
        return "console"
    if settings.trace_exporter == "otlp" or any(env.get(name) for name in OTLP_ENDPOINTS):
        return "otlp"
    return "none"


def prometheus_reader(registry: CollectorRegistry) -> MetricReader:
    """A reader that answers a scrape of `registry` with the current values."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader

    return PrometheusMetricReader(registry=registry)


def serve_prometheus(registry: CollectorRegistry, host: str, port: int) -> Callable[[], None]:
    """Serve ``/metrics`` of `registry` on host:port (a thread); returns its stop."""
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"MESH_METRICS_PORT={port}: cannot serve metrics on {host}:{port} ({exc.strerror or exc}); "
            f"give a free port (each process on a host needs its own), or 0 for no endpoint"
        ) from None

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop


def configure_metrics(
    settings: Settings, service_name: str, instance: str = "", *, scrape: bool = False
) -> Callable[[], None]:
    """Install this process's meter provider; returns the shutdown to call before exit
    (the last push, then the scrape endpoint closes).

    `scrape`: serve a Prometheus endpoint when MESH_METRICS_PORT is set (agent processes;
    a CLI command never opens one, so it cannot take an agent's port).
    """
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    readers: list[Any] = []
    kind = metrics_exporter_kind(settings)
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    elif kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    stop_server: Callable[[], None] | None = None
    if scrape and settings.metrics_port:
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=True)
        readers.append(prometheus_reader(registry))
        stop_server = serve_prometheus(registry, settings.metrics_host, settings.metrics_port)
    if not readers:
        return lambda: None
    attrs: dict[str, Any] = {"service.name": service_name}
    if instance:
        attrs["service.instance.id"] = instance
    provider = MeterProvider(resource=Resource.create(attrs), metric_readers=readers)
    metrics.set_meter_provider(provider)

    def shutdown() -> None:
        provider.shutdown()
        if stop_server is not None:
            stop_server()

    return shutdown
