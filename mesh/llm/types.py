"""What goes to a model and what comes back: turns of content blocks, tool specs, usage,
the provider interface, and the typed errors every provider raises."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

import msgspec

from mesh.wire.errors import MeshError


class Text(msgspec.Struct, frozen=True, tag="text"):
    text: str


class ToolCall(msgspec.Struct, frozen=True, tag="tool_use"):
    """The model asks for a tool. ``error`` is set when the provider could not read the
    arguments (malformed JSON): the tool loop answers it with that error, it never runs."""

    id: str
    name: str
    input: dict[str, Any]
    error: str = ""


class ToolOutput(msgspec.Struct, frozen=True, tag="tool_result"):
    tool_use_id: str
    content: str
    is_error: bool = False


Block = Text | ToolCall | ToolOutput
Role = Literal["user", "assistant"]


class Turn(msgspec.Struct, frozen=True):
    role: Role
    content: list[Block]

    @classmethod
    def user(cls, text: str) -> Turn:
        return cls("user", [Text(text)])

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.content if isinstance(b, Text))


class ToolSpec(msgspec.Struct, frozen=True):
    """A tool as a model sees it: a name, what it does, and the JSON Schema of its input."""

    name: str
    description: str
    input_schema: dict[str, Any]


class Usage(msgspec.Struct, frozen=True):
    input_tokens: int = 0
    output_tokens: int = 0


class Request(msgspec.Struct, frozen=True, kw_only=True):
    system: str = ""
    messages: list[Turn]
    tools: list[ToolSpec] = []
    max_tokens: int = 512


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    content: list[Block]
    stop_reason: str = "end_turn"
    usage: Usage = Usage()
    model: str = ""
    provider: str = ""  # the provider's name, e.g. "anthropic:claude-sonnet-4-5"

    @property
    def text(self) -> str:
        return "".join(b.text for b in self.content if isinstance(b, Text))

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [b for b in self.content if isinstance(b, ToolCall)]


class Delta(msgspec.Struct, frozen=True):
    """A piece of text while a reply streams."""

    text: str


StreamEvent = Delta | Reply  # deltas, then exactly one Reply with the whole answer


class LLM(Protocol):
    """What agents use through ``ctx.llm``: providers and the router all speak it."""

    name: str

    async def complete(self, *, system: str, prompt: str, max_tokens: int = 512) -> str:
        """The model's text for `prompt` under `system` instructions."""
        ...

    async def chat(self, request: Request) -> Reply:
        """One model turn: text and/or tool calls."""
        ...

    def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        """The same turn as text deltas while it is generated, then the whole `Reply`."""
        ...


class Provider(LLM, Protocol):
    """One model behind one API. ``system`` is the GenAI semantic-convention provider name."""

    system: str
    model: str


class LLMError(MeshError):
    """The model provider failed; the message says which provider and why.

    ``retryable``: rate limits, overload, 5xx and timeouts; worth another attempt.
    ``status``: the HTTP status, when there was one.
    """

    def __init__(self, reason: str, *, retryable: bool = False, status: int | None = None) -> None:
        super().__init__(reason)
        self.retryable = retryable
        self.status = status


class CircuitOpen(LLMError):
    """The provider failed repeatedly; its breaker is open and calls skip it for a while."""


class LLMUnavailable(LLMError):
    """Every provider of a router failed; ``errors`` says how each one did."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("no model provider answered: " + "; ".join(errors), retryable=True)
        self.errors = errors


RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})


def status_error(provider: str, status: int, detail: str) -> LLMError:
    return LLMError(
        f"{provider}: HTTP {status}: {detail}", retryable=status in RETRYABLE_STATUS, status=status
    )


class Base:
    """`complete` for any provider in terms of its `chat`."""

    async def chat(self, request: Request) -> Reply:
        raise NotImplementedError

    async def complete(self, *, system: str, prompt: str, max_tokens: int = 512) -> str:
        reply = await self.chat(Request(system=system, messages=[Turn.user(prompt)], max_tokens=max_tokens))
        return reply.text
