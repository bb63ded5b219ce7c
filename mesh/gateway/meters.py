"""The gateway's HTTP metrics (docs/gateway.md#metrics), as OpenTelemetry's HTTP server
conventions name them:

- ``http.server.request.duration`` (histogram, seconds): every request, by method, route
  template and status; its count is the number of requests;
- ``http.server.active_requests`` (up-down counter): requests being served now, streams
  of server-sent events included.

The route is the template (``/v1/conversations/{id}``), never the path a caller sent, and a
method outside HTTP's own is ``_OTHER``: nothing a caller writes becomes a label, so a
hostile caller cannot grow the number of series. They are exported where the agents'
metrics are (`mesh.observability.metrics.configure_metrics`): the scrape endpoint on
MESH_METRICS_PORT, or OTLP.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

from opentelemetry import metrics

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

METHODS: Final = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"))
UNMATCHED: Final = "unmatched"  # no route took the request (a 404 of the router)
# seconds: from a refused token (well under a millisecond) to a stream followed for minutes
BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)


class RequestMeters:
    """ASGI middleware around the gateway's app: times and counts each HTTP request."""

    def __init__(self, app: ASGIApp, meter_provider: MeterProvider | None = None) -> None:
        self.app = app
        meter = (meter_provider or metrics.get_meter_provider()).get_meter("mesh.gateway")
        self.duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Time to serve an HTTP request, to the end of its response",
            explicit_bucket_boundaries_advisory=BUCKETS,
        )
        self.active = meter.create_up_down_counter(
            "http.server.active_requests", unit="{request}", description="HTTP requests being served now"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        method = method if method in METHODS else "_OTHER"
        status = 500  # what the client gets if the app raises before it answers
        started = time.perf_counter()
        self.active.add(1, {"http.request.method": method})

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.active.add(-1, {"http.request.method": method})
            attrs: dict[str, Any] = {
                "http.request.method": method,
                "http.route": _route(scope),
                "http.response.status_code": status,
            }
            self.duration.record(time.perf_counter() - started, attrs)


def _route(scope: Scope) -> str:
    """The template of the route that took the request (the router sets it on the scope)."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) and path else UNMATCHED
