"""Model providers behind one interface, used by every agent as ``ctx.llm``.

`OfflineLLM` is deterministic and needs no network: the default without a key.
`a2a_tool` makes a remote A2A agent a tool.
`AnthropicLLM` calls Claude through the official `anthropic` SDK; `OpenAICompatLLM` any
OpenAI-compatible endpoint. `make_llm` wraps the configured ones in a `Router`. An agent's
runtime wraps its model in `Journaled`, so a redelivered message does not pay twice.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mesh.llm.budget import Budget, Budgeted, budgeted
from mesh.llm.claude import AnthropicLLM
from mesh.llm.journal import Journaled
from mesh.llm.limits import CircuitBreaker, Limits, TokenBucket
from mesh.llm.metering import Metering, Scope, current_scope, llm_scope
from mesh.llm.offline import OfflineLLM
from mesh.llm.openai_compat import OpenAICompatLLM
from mesh.llm.router import Router
from mesh.llm.types import (
    LLM,
    CircuitOpen,
    Delta,
    LLMError,
    LLMUnavailable,
    Provider,
    Reply,
    Request,
    StreamEvent,
    Text,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Turn,
    Usage,
)
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

if TYPE_CHECKING:
    from mesh.llm.a2a import a2a_tool

__all__ = [
    "LLM",
    "AnthropicLLM",
    "Budget",
    "Budgeted",
    "CircuitBreaker",
    "CircuitOpen",
    "Delta",
    "Journaled",
    "LLMError",
    "LLMUnavailable",
    "Limits",
    "Metering",
    "OfflineLLM",
    "OpenAICompatLLM",
    "Provider",
    "Reply",
    "Request",
    "Router",
    "Scope",
    "StreamEvent",
    "Text",
    "TokenBucket",
    "ToolCall",
    "ToolOutput",
    "ToolSpec",
    "Turn",
    "Usage",
    "a2a_tool",
    "budgeted",
    "current_scope",
    "llm_scope",
    "make_llm",
]


def __getattr__(name: str) -> Any:
    # the A2A client (mesh.llm.a2a) is imported when it is first asked for: it costs every
    # agent's start a fifth of a second otherwise
    if name == "a2a_tool":
        from mesh.llm.a2a import a2a_tool

        return a2a_tool
    raise AttributeError(f"module 'mesh.llm' has no attribute {name!r}")


def make_provider(kind: str, settings: Settings) -> Provider:
    """One provider by kind: anthropic, openai or offline."""
    if kind == "anthropic":
        key = os.environ.get("ANTHROPIC_API_KEY")
        if not key:
            raise ConfigError("MESH_LLM=anthropic needs ANTHROPIC_API_KEY to be set")
        return AnthropicLLM(settings.anthropic_model, api_key=key, timeout=settings.llm_timeout)
    if kind == "openai":
        if not settings.openai_base_url:
            raise ConfigError(
                "the openai provider needs MESH_OPENAI_BASE_URL (e.g. http://localhost:8000/v1)"
            )
        return OpenAICompatLLM(
            settings.openai_model,
            base_url=settings.openai_base_url,
            api_key=os.environ.get("OPENAI_API_KEY"),
            timeout=settings.llm_timeout,
        )
    if kind == "offline":
        return OfflineLLM()
    raise ConfigError(
        f"unknown model provider {kind!r} in MESH_LLM_FALLBACK: use anthropic, openai or offline"
    )


def make_llm(settings: Settings) -> Router:
    """The router over the providers the settings ask for (``MESH_LLM``, ``MESH_LLM_FALLBACK``)."""
    first = settings.llm
    if first == "auto":
        if os.environ.get("ANTHROPIC_API_KEY"):
            first = "anthropic"
        elif settings.openai_base_url:
            first = "openai"
        else:
            first = "offline"
    kinds = [first, *(k.strip() for k in settings.llm_fallback.split(",") if k.strip())]
    kinds = list(dict.fromkeys(kinds))
    return Router(
        [make_provider(k, settings) for k in kinds],
        retries=settings.llm_retries,
        timeout=settings.llm_timeout,
        breaker=lambda: CircuitBreaker(settings.llm_breaker_failures, settings.llm_breaker_reset),
        limits=Limits(settings.llm_rate, settings.llm_burst, settings.llm_concurrency),
    )
