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

import json
import logging
import os
import random
import re
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from time import time_ns
from types import TracebackType
from typing import Any, cast

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AnyValue, Attributes

from mesh.middleware.base import Call
from mesh.wire.envelope import TRACEPARENT, TRACESTATE
from mesh.wire.settings import Settings

_propagator = TraceContextTextMapPropagator()
TRACER_NAME = "mesh"
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
        lines = b"".join([encode(_SpanLine.of(s)) + b"\n" for s in spans])
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, lines)
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


class _SpanLine(msgspec.Struct, omit_defaults=False):
    """One line of the span file (the fields of `span_record`, in that order)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    service: Any
    start_ns: int | None
    end_ns: int | None
    status: str
    attributes: dict[str, Any]
    links: list[str]

    @classmethod
    def of(cls, span: ReadableSpan | HandlerSpan) -> _SpanLine:
        if isinstance(span, HandlerSpan):
            return span.line()
        ctx = span.get_span_context()
        assert ctx is not None
        parent = span.parent
        return cls(
            f"{ctx.trace_id:032x}",
            f"{ctx.span_id:016x}",
            f"{parent.span_id:016x}" if parent else None,
            span.name,
            span.kind.name,
            span.resource.attributes.get("service.name"),
            span.start_time,
            span.end_time,
            span.status.status_code.name,
            dict(span.attributes or {}),
            [f"{link.context.span_id:016x}" for link in span.links],
        )


# spans are exported on the SDK's worker thread, but this costs the process's CPU (and the GIL)
# all the same: msgspec writes a line in a fraction of json.dumps's time
_span_encoder = msgspec.json.Encoder(enc_hook=str)


def span_record(span: ReadableSpan | HandlerSpan) -> dict[str, Any]:
    """A finished span as the span file stores it."""
    return msgspec.structs.asdict(_SpanLine.of(span))


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
    meters = _meter_provider(settings, resource)

    def shutdown() -> None:
        provider.shutdown()
        if meters is not None:
            meters.shutdown()

    return shutdown


def tracer_provider(exporter: SpanExporter, resource: Resource, sample: float) -> TracerProvider:
    """The provider `configure_tracing` installs: `sampler` (sample), one batch processor to
    `exporter`, and handler spans recorded as `HandlerSpan`s."""
    provider = _Provider(resource=resource, sampler=sampler(sample))
    batches = BatchSpanProcessor(
        exporter if isinstance(exporter, JsonLinesSpanExporter) else _AsReadable(exporter)
    )
    provider.add_span_processor(batches)
    provider.recorder = _Recorder.of(provider, batches, sample)
    return provider


def _meter_provider(settings: Settings, resource: Resource) -> Any:
    """Metrics (model tokens and cost, docs/llm-and-tools.md) go where spans go, for the
    OTLP and console exporters; the span file carries the same numbers as span attributes."""
    from opentelemetry import metrics
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import (
        ConsoleMetricExporter,
        MetricExporter,
        PeriodicExportingMetricReader,
    )

    choice = exporter_kind(settings)
    exporter: MetricExporter
    if choice == "otlp":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        exporter = OTLPMetricExporter()
    elif choice == "console":
        exporter = ConsoleMetricExporter()
    else:
        return None
    meters = MeterProvider(resource=resource, metric_readers=[PeriodicExportingMetricReader(exporter)])
    metrics.set_meter_provider(meters)
    return meters


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


def current_trace_id() -> str:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


_OK = Status(StatusCode.OK)


def tracing(call_next: Call) -> Call:
    """Middleware: run the handler in a span that continues the message's trace.

    Under the mesh's own provider the span is a `HandlerSpan` (see `_Recorder`); under any
    other it is the SDK's, started and made current by hand rather than through
    ``start_as_current_span``, whose two nested generator context managers cost about as
    much again as the SDK span itself.
    """
    tracer = trace.get_tracer(TRACER_NAME)  # a proxy until a provider is installed
    names: dict[tuple[str, str], str] = {}

    async def call(ctx: Any, msg: Any) -> Any:
        env = ctx.envelope
        provider = trace.get_tracer_provider()
        recorder = provider.recorder if type(provider) is _Provider else None
        links: Sequence[Link] = ()
        if ctx.join_name:  # a join's completion: one span, linked to every answer it gathered
            name = f"{ctx.agent} join {ctx.join_name}"
            links = [Link(linked) for tp in ctx.gathered if (linked := _remote_parent({TRACEPARENT: tp}))]
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


class _Provider(TracerProvider):
    """The provider `configure_tracing` installs. Its `recorder` makes handler spans while the
    batch processor mesh added is the only processor; once another is added, handler spans
    are the SDK's again, so that processor sees them."""

    recorder: _Recorder | None = None

    def add_span_processor(self, span_processor: Any) -> None:
        super().add_span_processor(span_processor)
        self.recorder = None


class _AsReadable(SpanExporter):
    """Hands an exporter SDK `ReadableSpan`s: handler spans become one here, on the batch
    processor's thread, not on the event loop."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan | HandlerSpan]) -> SpanExportResult:
        return self.exporter.export([s.readable() if isinstance(s, HandlerSpan) else s for s in spans])

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


_NOT_SET = Status(StatusCode.UNSET)
_STATUS_NAMES = {code: code.name for code in StatusCode}
_FLAGS = tuple(TraceFlags(i) for i in range(256))
_SAMPLED, _RANDOM_ID = TraceFlags.SAMPLED, TraceFlags.RANDOM_TRACE_ID
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_MESH_ATTRIBUTES = 9  # how many attributes `tracing` gives a handler span


def _remote_parent(headers: Mapping[str, str]) -> SpanContext | None:
    """The span a message's W3C ``traceparent`` names; None without a valid one.

    The propagator's rules; the usual header (version 00, no ``tracestate``) is read here
    without building a Context and a span to carry it.
    """
    traceparent = headers.get(TRACEPARENT)
    if not traceparent:
        return None
    match = _TRACEPARENT_00.fullmatch(traceparent)
    if match is None or TRACESTATE in headers:
        found = trace.get_current_span(_propagator.extract(headers)).get_span_context()
        return found if found.is_valid else None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not (trace_id and span_id):
        return None
    return SpanContext(trace_id, span_id, True, _FLAGS[int(match[3], 16)])


class _Recorder:
    """Starts handler spans as the SDK's tracer would, and queues the finished ones.

    The decisions are the SDK's, made without its objects: ids from the same generator
    (`random.getrandbits`), the sampler of `sampler` (a remote parent's flag, else the
    trace-id ratio), trace flags and trace state as `Tracer.start_span` sets them.
    """

    __slots__ = ("bound", "info", "limits", "processor", "resource", "sample_all", "scope", "service")

    def __init__(
        self,
        processor: BatchSpanProcessor,
        tracer: SdkTracer,
        limits: SpanLimits,
        fraction: float,
    ) -> None:
        self.processor = processor
        self.resource = tracer.resource
        self.service = tracer.resource.attributes.get("service.name")
        self.info = tracer.instrumentation_info
        self.scope = InstrumentationScope(TRACER_NAME, "", None, None)  # as get_tracer(TRACER_NAME) names it
        self.limits = limits
        self.sample_all = fraction >= 1.0
        self.bound = TraceIdRatioBased.get_bound_for_rate(min(max(fraction, 0.0), 1.0))

    @classmethod
    def of(cls, provider: TracerProvider, processor: BatchSpanProcessor, fraction: float) -> _Recorder | None:
        """None where only the SDK's own span comes out the same: the SDK switched off
        (``OTEL_SDK_DISABLED``), its self-metrics on, or span limits that would cut the
        mesh's own attributes."""
        tracer = provider.get_tracer(TRACER_NAME)
        if not isinstance(tracer, SdkTracer):
            return None
        if os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "").strip().lower() == "true":
            return None
        limits = SpanLimits()  # what the provider read from the same environment
        fits = limits.max_span_attributes is None or limits.max_span_attributes >= _MESH_ATTRIBUTES
        if not fits or limits.max_span_attribute_length is not None:
            return None
        return cls(processor, tracer, limits, fraction)

    def start(
        self, name: str, headers: Mapping[str, str], attributes: dict[str, AnyValue], links: Sequence[Link]
    ) -> trace.Span:
        parent = _remote_parent(headers)
        if parent is None:
            while not (trace_id := random.getrandbits(128)):
                pass
            sampled = self.sample_all or trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < self.bound
            flags = _RANDOM_ID | _SAMPLED if sampled else _RANDOM_ID
            trace_state = None
        else:  # ParentBased: a remote parent's decision stands
            trace_id = parent.trace_id
            sampled = parent.trace_flags.sampled
            flags = parent.trace_flags & _RANDOM_ID | _SAMPLED if sampled else parent.trace_flags & _RANDOM_ID
            trace_state = parent.trace_state
        while not (span_id := random.getrandbits(64)):
            pass
        context = SpanContext(trace_id, span_id, False, _FLAGS[flags], trace_state)
        if not sampled:
            return trace.NonRecordingSpan(context)
        if links:
            links = self._links(links)
        return HandlerSpan(self, name, context, parent, attributes, links)

    def _links(self, links: Sequence[Link]) -> BoundedList[Link]:
        """Links as the SDK keeps them: valid ones, their attributes bounded, the newest
        `max_links`."""
        limits = self.limits
        return BoundedList.from_seq(
            limits.max_links,
            [
                Link(
                    link.context,
                    BoundedAttributes(
                        limits.max_link_attributes,
                        link.attributes,
                        immutable=True,
                        max_value_len=limits.max_attribute_length,
                    ),
                )
                for link in links
                if link.context.is_valid or link.attributes or link.context.trace_state
            ],
        )

    def finish(self, span: HandlerSpan) -> None:
        # the batch processor reads the span's context (sampled or not) and queues it; the
        # exporter gets it on the processor's thread (`_AsReadable`, `JsonLinesSpanExporter`)
        self.processor.on_end(cast(ReadableSpan, span))


class HandlerSpan(trace.Span):
    """A handler's span as the hot path records it, and the current span while it runs.

    To the OpenTelemetry API it is a span like any other (context, attributes, events,
    links, status, end), so code in a handler can read it, add to it and start child spans
    under it. To exporters it has the fields of an SDK `ReadableSpan`, and `readable()` makes
    one. It costs a fraction of an SDK span: no sampler objects, lock, processor callbacks or
    checks of the mesh's own attributes (attributes a handler adds are checked as the SDK
    checks them).
    """

    __slots__ = (
        "_attributes",
        "_context",
        "_end",
        "_events",
        "_links",
        "_name",
        "_parent",
        "_recorder",
        "_start",
        "_status",
    )

    kind = SpanKind.CONSUMER
    _kind_name = kind.name

    def __init__(
        self,
        recorder: _Recorder,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, AnyValue],
        links: Sequence[Link],
    ) -> None:
        self._recorder = recorder
        self._name = name
        self._context = context
        self._parent = parent
        self._attributes: dict[str, AnyValue] | BoundedAttributes = attributes
        self._links = links
        self._events: Sequence[Event] = ()
        self._status = _NOT_SET
        self._start = time_ns()
        self._end: int | None = None

    # the API

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end is None

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            _log.warning("Calling end() on an ended span.")
            return
        self._end = end_time if end_time is not None else time_ns()
        self._recorder.finish(self)

    def set_attribute(self, key: str, value: AnyValue) -> None:
        self.set_attributes({key: value})

    def set_attributes(self, attributes: Mapping[str, AnyValue]) -> None:
        if self._end is not None:
            _log.warning("Setting attribute on ended span.")
            return
        attrs = self._attributes
        if not isinstance(attrs, BoundedAttributes):  # the first a handler adds: the SDK's checks from here
            limits = self._recorder.limits
            attrs = self._attributes = BoundedAttributes(
                limits.max_span_attributes,
                attrs,
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
        for key, value in attributes.items():
            attrs[key] = value

    def add_event(self, name: str, attributes: Attributes = None, timestamp: int | None = None) -> None:
        if self._ended("add_event"):
            return
        limits = self._recorder.limits
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, immutable=True, max_value_len=limits.max_attribute_length
        )
        events = self._events
        if not isinstance(events, BoundedList):
            events = self._events = BoundedList(limits.max_events)
        events.append(Event(name, bounded, timestamp))

    def add_link(self, context: SpanContext, attributes: Attributes = None) -> None:
        valid = context and (context.is_valid or attributes or context.trace_state)  # the SDK's rule
        if not valid or self._ended("add_link"):
            return
        links = self._links
        if not isinstance(links, BoundedList):
            links = self._links = BoundedList.from_seq(self._recorder.limits.max_links, links)
        links.extend(self._recorder._links([Link(context, attributes)]))

    def update_name(self, name: str) -> None:
        if not self._ended("update_name"):
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # the SDK's rules: OK is final, UNSET is never set, a description goes with a StatusCode
        if self._ended("set_status") or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                _log.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`", description
                )
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module, qualname = type(exception).__module__, type(exception).__qualname__
        event: dict[str, AnyValue] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():  # as an SDK span used as a context manager
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    def _ended(self, method: str) -> bool:
        if self._end is None:
            return False
        _log.warning("Tried calling %s on an ended span.", method)
        return True

    # what exporters read, as on a ReadableSpan

    @property
    def name(self) -> str:
        return self._name

    @property
    def context(self) -> SpanContext:
        return self._context

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    @property
    def start_time(self) -> int:
        return self._start

    @property
    def end_time(self) -> int | None:
        return self._end

    @property
    def status(self) -> Status:
        return self._status

    @property
    def attributes(self) -> Mapping[str, AnyValue]:
        return self._attributes

    @property
    def links(self) -> Sequence[Link]:
        return self._links

    @property
    def resource(self) -> Resource:
        return self._recorder.resource

    def line(self) -> _SpanLine:
        """This span as a line of the span file, read from its fields (what `_SpanLine.of`
        reads from an SDK span, at about half the cost: no properties or enum names)."""
        context, parent, attributes = self._context, self._parent, self._attributes
        return _SpanLine(
            f"{context.trace_id:032x}",
            f"{context.span_id:016x}",
            f"{parent.span_id:016x}" if parent else None,
            self._name,
            self._kind_name,
            self._recorder.service,
            self._start,
            self._end,
            _STATUS_NAMES[self._status.status_code],
            attributes if type(attributes) is dict else dict(attributes),
            [f"{link.context.span_id:016x}" for link in self._links],
        )

    def readable(self) -> ReadableSpan:
        """The SDK span exporters take, with the fields the SDK's own span would have had."""
        recorder = self._recorder
        return ReadableSpan(
            name=self._name,
            context=self._context,
            parent=self._parent,
            resource=recorder.resource,
            attributes=self._attributes,
            events=self._events,
            links=self._links,
            kind=self.kind,
            instrumentation_info=recorder.info,
            status=self._status,
            start_time=self._start,
            end_time=self._end,
            instrumentation_scope=recorder.scope,
        )


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
