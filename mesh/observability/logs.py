"""Structured logs: one JSON event per line, with trace, span, conversation and agent ids."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from mesh.middleware.base import Call
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
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[settings.log_level]),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if bind:
        structlog.contextvars.bind_contextvars(**bind)


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
