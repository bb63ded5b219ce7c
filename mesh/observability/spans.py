"""Handler spans recorded without the OpenTelemetry SDK on the hot path.

`HandlerSpan` holds a handler's ids, times, attributes, status and links in one small
object; it is current through the API like any span, queued on the SDK's batch processor
when it ends, and turned into an SDK `ReadableSpan` only on that processor's thread
(`AsReadable`), for exporters that need one. `Recorder` starts them making the SDK's
decisions (ids, sampling, flags) itself; `Provider` is the tracer provider that uses it.
"""

from __future__ import annotations

import logging
import os
import random
import re
import traceback
from collections.abc import Mapping, Sequence
from time import time_ns
from types import TracebackType
from typing import Any, cast

import msgspec
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AnyValue, Attributes

from mesh.wire.envelope import TRACEPARENT, TRACESTATE

TRACER_NAME = "mesh"
_propagator = TraceContextTextMapPropagator()
_log = logging.getLogger(__name__)


class Provider(TracerProvider):
    """The provider `configure_tracing` installs. Its `recorder` makes handler spans while the
    batch processor mesh added is the only processor; once another is added, handler spans
    are the SDK's again, so that processor sees them."""

    recorder: Recorder | None = None

    def add_span_processor(self, span_processor: Any) -> None:
        super().add_span_processor(span_processor)
        self.recorder = None


class AsReadable(SpanExporter):
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


def remote_parent(headers: Mapping[str, str]) -> SpanContext | None:
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


class Recorder:
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
    def of(cls, provider: TracerProvider, processor: BatchSpanProcessor, fraction: float) -> Recorder | None:
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
        parent = remote_parent(headers)
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
        # exporter gets it on the processor's thread (`AsReadable`, `JsonLinesSpanExporter`)
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
        recorder: Recorder,
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

    def line(self) -> SpanLine:
        """This span as a line of the span file, read from its fields (what `SpanLine.of`
        reads from an SDK span, at about half the cost: no properties or enum names)."""
        context, parent, attributes = self._context, self._parent, self._attributes
        return SpanLine(
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


class SpanLine(msgspec.Struct, omit_defaults=False):
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
    def of(cls, span: ReadableSpan | HandlerSpan) -> SpanLine:
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
