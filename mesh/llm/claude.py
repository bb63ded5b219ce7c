"""Claude through the official `anthropic` SDK's Messages API: text, tool use, SSE streaming.

The SDK's own retries are off: the router retries, with backoff, across providers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from mesh.llm.types import (
    Base,
    Block,
    Delta,
    LLMError,
    Reply,
    Request,
    StreamEvent,
    Text,
    ToolCall,
    ToolOutput,
    Usage,
    status_error,
)


class AnthropicLLM(Base):
    system = "anthropic"

    def __init__(
        self,
        model: str,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        import anthropic

        self.name = f"anthropic:{model}"
        self.model = model
        self._anthropic = anthropic
        self._client = anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout
        )

    def _params(self, request: Request) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": request.max_tokens,
            "messages": [
                {"role": t.role, "content": [_block_out(b) for b in t.content]} for t in request.messages
            ],
        }
        if request.system:
            params["system"] = request.system
        if request.tools:
            params["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": t.input_schema}
                for t in request.tools
            ]
        return params

    async def chat(self, request: Request) -> Reply:
        try:
            response = await self._client.messages.create(**self._params(request))
        except self._anthropic.APIError as exc:
            raise self._error(exc) from exc
        return self._reply(response)

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        try:
            async with self._client.messages.stream(**self._params(request)) as stream:
                async for text in stream.text_stream:
                    yield Delta(text)
                final = await stream.get_final_message()
        except self._anthropic.APIError as exc:
            raise self._error(exc) from exc
        yield self._reply(final)

    def _reply(self, response: Any) -> Reply:
        content: list[Block] = []
        for block in response.content:
            if block.type == "text":
                content.append(Text(block.text))
            elif block.type == "tool_use":
                args = block.input if isinstance(block.input, dict) else {}
                error = (
                    "" if isinstance(block.input, dict) else f"tool input is not an object: {block.input!r}"
                )
                content.append(ToolCall(id=block.id, name=block.name, input=args, error=error))
        usage = Usage(response.usage.input_tokens, response.usage.output_tokens)
        return Reply(
            content=content,
            stop_reason=response.stop_reason or "end_turn",
            usage=usage,
            model=response.model,
            provider=self.name,
        )

    def _error(self, exc: Exception) -> LLMError:
        a = self._anthropic
        if isinstance(exc, a.APITimeoutError):
            return LLMError(f"{self.name}: timed out: {exc}", retryable=True)
        if isinstance(exc, a.APIConnectionError):
            return LLMError(f"{self.name}: cannot connect: {exc}", retryable=True)
        if isinstance(exc, a.APIStatusError):
            return status_error(self.name, exc.status_code, f"{type(exc).__name__}: {exc}")
        return LLMError(f"{self.name}: {type(exc).__name__}: {exc}")


def _block_out(block: Block) -> dict[str, Any]:
    if isinstance(block, Text):
        return {"type": "text", "text": block.text}
    if isinstance(block, ToolCall):
        return {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
    assert isinstance(block, ToolOutput)
    return {
        "type": "tool_result",
        "tool_use_id": block.tool_use_id,
        "content": block.content,
        "is_error": block.is_error,
    }
