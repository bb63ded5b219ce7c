"""OpenTelemetry: one trace per conversation, across every process it touches.

A handler runs in a CONSUMER span whose parent comes from the message's W3C
``traceparent`` header; everything it sends carries that span's context on.
Spans go to OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, else to a JSON-lines file
that `mesh trace` and the demo read.

Under the provider `configure_tracing` installs, a handler's span is a `HandlerSpan`: ids,
times, attributes, status and links in one small object, made current through the API like
any span, queued on the SDK's batch processor when it ends and turned into an SDK
`ReadableSpan` only on that processor's thread, for exporters that need one. Under any other
provider (a test's, a user's) handler spans are the SDK's own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh.middleware.base import Call
from mesh.middleware.publish import Outgoing, Send
from mesh.observability.spans import (
    TRACER_NAME,
    AsReadable,
    HandlerSpan,
    Provider,
    Recorder,
    SpanLine,
    remote_parent,
)
from mesh.wire.envelope import TRACEPARENT
from mesh.wire.settings import Settings

_propagator = TraceContextTextMapPropagator()
_log = logging.getLogger(__name__)


class JsonLinesSpanExporter(SpanExporter):
    """Appends finished spans to a file, one JSON object per line.

    Each batch is a single O_APPEND write, so several processes can share one file. Handler
    spans are written as they were recorded, without becoming SDK spans first.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan | HandlerSpan]) -> SpanExportResult:
        encode = _span_encoder.encode
        lines = b"".join([encode(SpanLine.of(s)) + b"\n" for s in spans])
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, lines)
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


# spans are exported on the SDK's worker thread, but this costs the process's CPU (and the GIL)
# all the same: msgspec writes a line in a fraction of json.dumps's time
_span_encoder = msgspec.json.Encoder(enc_hook=str)


def span_record(span: ReadableSpan | HandlerSpan) -> dict[str, Any]:
    """A finished span as the span file stores it."""
    return msgspec.structs.asdict(SpanLine.of(span))


def read_spans(path: Path, trace_id: str | None = None) -> list[dict[str, Any]]:
    """Spans from a JSON-lines span file, optionally of one trace."""
    out = []
    try:
        with path.open() as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if trace_id is None or rec.get("trace_id") == trace_id:
                    out.append(rec)
    except FileNotFoundError:
        return []
    return out


CONVERSATION_ATTRS = ("messaging.message.conversation_id", "mesh.conversation")


def conversation_traces(spans: list[dict[str, Any]], conversation: str) -> list[str]:
    """The ids of the traces with a span of `conversation`, in the order they started (a
    conversation is one trace, unless something that did not carry the context split it)."""
    first: dict[str, int] = {}
    for s in spans:
        attrs = s.get("attributes") or {}
        if any(attrs.get(a) == conversation for a in CONVERSATION_ATTRS):
            tid = str(s.get("trace_id", ""))
            first[tid] = min(first.get(tid, s["start_ns"]), s["start_ns"])
    return sorted(first, key=first.__getitem__)


def configure_tracing(settings: Settings, service_name: str, instance: str = "") -> Callable[[], None]:
    """Install this process's tracer provider; returns the shutdown to call before exit.

    With no exporter nothing is installed: the API's non-recording spans still carry the
    incoming trace context onward, so a trace stays whole across a process that records
    nothing, at almost no cost.
    """
    exporter = _exporter(settings)
    if exporter is None:
        return lambda: None
    attrs: dict[str, Any] = {"service.name": service_name}
    if instance:
        attrs["service.instance.id"] = instance
    resource = Resource.create(attrs)
    provider = tracer_provider(exporter, resource, settings.trace_sample)
    trace.set_tracer_provider(provider)
    return provider.shutdown


def tracer_provider(exporter: SpanExporter, resource: Resource, sample: float) -> TracerProvider:
    """The provider `configure_tracing` installs: `sampler` (sample), one batch processor to
    `exporter`, and handler spans recorded as `HandlerSpan`s."""
    provider = Provider(resource=resource, sampler=sampler(sample))
    batches = BatchSpanProcessor(
        exporter if isinstance(exporter, JsonLinesSpanExporter) else AsReadable(exporter)
    )
    provider.add_span_processor(batches)
    provider.recorder = Recorder.of(provider, batches, sample)
    return provider


def sampler(fraction: float) -> Sampler:
    """Parent-based: follow the upstream decision when the message carries one; for a new
    trace, record `fraction` of them (by trace id, so every process agrees)."""
    return ParentBased(ALWAYS_ON if fraction >= 1.0 else TraceIdRatioBased(fraction))


def exporter_kind(settings: Settings) -> str:
    """Where spans go: otlp, file, console or none (``auto`` resolved)."""
    choice = settings.trace_exporter
    if choice == "auto":
        otlp = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        choice = "otlp" if otlp else "file"
    return choice


def _exporter(settings: Settings) -> SpanExporter | None:
    choice = exporter_kind(settings)
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if choice == "file":
        return JsonLinesSpanExporter(settings.spans_path)
    if choice == "console":
        return ConsoleSpanExporter()
    return None


def extract_context(headers: dict[str, str]) -> Any:
    """The trace context a message's headers carry (W3C traceparent)."""
    return _propagator.extract(headers)


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" outside any), to continue it later."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT, "")


@contextlib.contextmanager
def continuing(traceparent: str) -> Iterator[None]:
    """Make `traceparent` the current context for the block (what is sent in it continues
    that trace); nothing changes for an empty or malformed one."""
    parent = remote_parent({TRACEPARENT: traceparent}) if traceparent else None
    if parent is None:
        yield
        return
    token = otel_context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        yield
    finally:
        otel_context.detach(token)


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


_OK = Status(StatusCode.OK)


def tracing(call_next: Call) -> Call:
    """Middleware: run the handler in a span that continues the message's trace.

    Under the mesh's own provider the span is a `HandlerSpan` (see `Recorder`); under any
    other it is the SDK's, started and made current by hand rather than through
    ``start_as_current_span``, whose two nested generator context managers cost about as
    much again as the SDK span itself.
    """
    tracer = trace.get_tracer(TRACER_NAME)  # a proxy until a provider is installed
    names: dict[tuple[str, str], str] = {}

    async def call(ctx: Any, msg: Any) -> Any:
        env = ctx.envelope
        provider = trace.get_tracer_provider()
        recorder = provider.recorder if type(provider) is Provider else None
        links: Sequence[Link] = ()
        if ctx.join_name:  # a join's completion: one span, linked to every answer it gathered
            name = f"{ctx.agent} join {ctx.join_name}"
            links = [Link(linked) for tp in ctx.gathered if (linked := remote_parent({TRACEPARENT: tp}))]
        else:
            key = (ctx.agent, env.type_name)
            name = names.get(key) or names.setdefault(key, f"{ctx.agent} process {env.type_name}")
        attributes = {
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": env.subject,
            "messaging.message.id": env.id,
            "messaging.message.conversation_id": env.conversation,
            "mesh.agent": ctx.agent,
            "mesh.sender": env.sender,
            "mesh.message.type": env.type_name,
            "mesh.hop": env.hop,
        }
        span: trace.Span
        if recorder is not None:
            span = recorder.start(name, env.headers, attributes, links)
        else:
            span = tracer.start_span(
                name,
                context=_propagator.extract(env.headers),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                links=links,
            )
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            result = await call_next(ctx, msg)
            span.set_status(_OK)
            return result
        except Exception as exc:  # as the SDK's use_span does: errors, not BaseExceptions
            if span.is_recording():
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    return call


def inject_trace(call_next: Send) -> Send:
    """Publish middleware: the current span's context goes out in the W3C ``traceparent``
    (and ``tracestate``) headers, so whoever handles the message continues the trace."""

    async def send(out: Outgoing) -> Any:
        _propagator.inject(out.headers)
        return await call_next(out)

    return send


def render_spans(spans: list[dict[str, Any]]) -> str:
    """A text tree of one trace's spans: start offset, name, process, duration."""
    start = min(s["start_ns"] for s in spans)
    return "\n".join(
        f"{(s['start_ns'] - start) / 1e6:9.1f} ms  {'   ' * depth}└─ {s['name']}  "
        f"[{s['service']}] {(s['end_ns'] - s['start_ns']) / 1e6:.1f} ms"
        for depth, s in iter_tree(spans)
    )


def iter_tree(spans: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Spans of one trace, depth first, with their depth."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in sorted(spans, key=lambda s: s["start_ns"]):
        parent = s["parent_span_id"] if s["parent_span_id"] in ids else None
        by_parent.setdefault(parent, []).append(s)

    def walk(parent: str | None, depth: int) -> Iterator[tuple[int, dict[str, Any]]]:
        for s in by_parent.get(parent, []):
            yield depth, s
            yield from walk(s["span_id"], depth + 1)

    yield from walk(None, 0)
