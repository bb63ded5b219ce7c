"""Structured logs: one JSON event per line, with trace, span, conversation and agent ids."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

from mesh.middleware import Call
from mesh.settings import Settings

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


def log_context(call_next: Call) -> Call:
    """Middleware: every log event inside a handler carries the ids of its message."""
    from opentelemetry import trace

    async def call(ctx: Any, msg: Any) -> Any:
        span = trace.get_current_span().get_span_context()
        with structlog.contextvars.bound_contextvars(
            conversation_id=ctx.conversation_id,
            message_id=ctx.message_id,
            trace_id=format(span.trace_id, "032x") if span.is_valid else None,
            span_id=format(span.span_id, "016x") if span.is_valid else None,
        ):
            return await call_next(ctx, msg)

    return call
