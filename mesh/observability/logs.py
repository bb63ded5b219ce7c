"""Structured logs: one JSON event per line, with trace, span, conversation and agent ids."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Collection, Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from mesh.middleware.base import Call
from mesh.wire.secrets import MASK, is_secret_header, scrub
from mesh.wire.settings import Settings

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(settings: Settings, *, stream: TextIO | None = None, **bind: Any) -> None:
    """Set up structlog for this process; `bind` adds fields to every event (e.g. agent)."""
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_message_ids,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            Redact(secret_values(os.environ)),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if bind:
        structlog.contextvars.bind_contextvars(**bind)


_SECRET_VARIABLE = re.compile(r"API_KEY|TOKEN|SECRET|PASSWORD", re.IGNORECASE)
_SHORTEST_SECRET = 8  # shorter values are too likely to occur in ordinary text
# a log field that holds a credential (api_key=, password=, a token=, db_password=), not one
# that merely mentions one (input_tokens=, reply_token_count=)
_SECRET_FIELD = re.compile(
    r"(^|_)(api_?key|password|passwd|secret|token|authorization|cookie|credentials?)$", re.IGNORECASE
)


def secret_values(environ: Mapping[str, str]) -> list[str]:
    """The values of this process's secret environment variables (ANTHROPIC_API_KEY,
    MESH_QDRANT_API_KEY, ...): never written to a log line."""
    found = {v for k, v in environ.items() if _SECRET_VARIABLE.search(k) and len(v) >= _SHORTEST_SECRET}
    return sorted(found, key=len, reverse=True)  # the longest first, so none is left half-masked


class Redact:
    """Processor: no secret reaches a log line. URLs lose their password (nats://app:***@host),
    known secret values (`values`) are masked wherever they appear, and so are the values of
    fields named like a credential (api_key=, token=, an Authorization header in headers=)."""

    def __init__(self, values: Collection[str] = ()) -> None:
        self.values = tuple(values)

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in event.items():
            event[key] = MASK if _SECRET_FIELD.search(key) and value else self._clean(value)
        return event

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return scrub(value, self.values)
        if isinstance(value, Mapping):  # headers, most often
            return {k: MASK if is_secret_header(str(k)) else self._clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._clean(v) for v in value]
        return value


_handling: ContextVar[Any] = ContextVar("mesh_handling", default=None)


def add_message_ids(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Processor: inside a handler, add the message's conversation, message, trace and span ids.

    The ids are looked up when an event is logged, not bound per message, so messages that
    log nothing pay only for one context variable.
    """
    ctx = _handling.get()
    if ctx is not None:
        event.setdefault("conversation_id", ctx.conversation_id)
        event.setdefault("message_id", ctx.message_id)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            event.setdefault("trace_id", format(span.trace_id, "032x"))
            event.setdefault("span_id", format(span.span_id, "016x"))
    return event


def log_context(call_next: Call) -> Call:
    """Middleware: every log event inside a handler carries the ids of its message."""

    async def call(ctx: Any, msg: Any) -> Any:
        token = _handling.set(ctx)
        try:
            return await call_next(ctx, msg)
        finally:
            _handling.reset(token)

    return call
