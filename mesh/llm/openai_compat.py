"""Any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp, Ollama, ...)
over httpx: text, function tools and SSE streaming."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

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

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use"}


class OpenAICompatLLM(Base):
    system = "openai"

    def __init__(
        self, model: str, *, base_url: str, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        self.name = f"openai:{model}"
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(headers=headers, timeout=timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    def _body(self, request: Request, stream: bool) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        for turn in request.messages:
            texts = "".join(b.text for b in turn.content if isinstance(b, Text))
            calls = [b for b in turn.content if isinstance(b, ToolCall)]
            if turn.role == "assistant":
                msg: dict[str, Any] = {"role": "assistant", "content": texts or None}
                if calls:
                    msg["tool_calls"] = [
                        {
                            "id": c.id,
                            "type": "function",
                            "function": {"name": c.name, "arguments": json.dumps(c.input)},
                        }
                        for c in calls
                    ]
                messages.append(msg)
                continue
            for b in turn.content:
                if isinstance(b, ToolOutput):
                    messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": b.content})
            if texts:
                messages.append({"role": "user", "content": texts})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": request.max_tokens}
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
                }
                for t in request.tools
            ]
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def chat(self, request: Request) -> Reply:
        try:
            response = await self._http.post(self.url, json=self._body(request, stream=False))
        except httpx.TimeoutException as exc:
            raise LLMError(f"{self.name}: timed out: {exc!r}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise LLMError(f"{self.name}: cannot connect: {exc!r}", retryable=True) from exc
        if response.status_code != 200:
            raise status_error(self.name, response.status_code, response.text[:500])
        try:
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise LLMError(f"{self.name}: unreadable response: {response.text[:300]!r}") from exc
        content: list[Block] = []
        if message.get("content"):
            content.append(Text(message["content"]))
        for call in message.get("tool_calls") or []:
            fn = call.get("function") or {}
            content.append(_tool_call(call.get("id", ""), fn.get("name", ""), fn.get("arguments") or ""))
        return Reply(
            content=content,
            stop_reason=_STOP.get(choice.get("finish_reason") or "stop", "end_turn"),
            usage=_usage(data.get("usage")),
            model=data.get("model") or self.model,
            provider=self.name,
        )

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        text: list[str] = []
        calls: dict[int, dict[str, str]] = {}
        finish, usage, model = "stop", Usage(), self.model
        try:
            async with self._http.stream("POST", self.url, json=self._body(request, stream=True)) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise status_error(self.name, response.status_code, response.text[:500])
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    try:
                        chunk = json.loads(payload)
                    except json.JSONDecodeError as exc:
                        raise LLMError(f"{self.name}: unreadable stream chunk {payload[:200]!r}") from exc
                    model = chunk.get("model") or model
                    if chunk.get("usage"):
                        usage = _usage(chunk["usage"])
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        if delta.get("content"):
                            text.append(delta["content"])
                            yield Delta(delta["content"])
                        for part in delta.get("tool_calls") or []:
                            slot = calls.setdefault(
                                int(part.get("index", 0)), {"id": "", "name": "", "args": ""}
                            )
                            fn = part.get("function") or {}
                            slot["id"] = part.get("id") or slot["id"]
                            slot["name"] += fn.get("name") or ""
                            slot["args"] += fn.get("arguments") or ""
                        finish = choice.get("finish_reason") or finish
        except httpx.TimeoutException as exc:
            raise LLMError(f"{self.name}: timed out: {exc!r}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise LLMError(f"{self.name}: cannot connect: {exc!r}", retryable=True) from exc
        content: list[Block] = [Text("".join(text))] if text else []
        content += [_tool_call(c["id"], c["name"], c["args"]) for _, c in sorted(calls.items())]
        yield Reply(
            content=content,
            stop_reason=_STOP.get(finish, "end_turn"),
            usage=usage,
            model=model,
            provider=self.name,
        )


def _tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    try:
        args = json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return ToolCall(call_id, name, {}, error=f"arguments are not JSON: {arguments[:200]!r}")
    if not isinstance(args, dict):
        return ToolCall(call_id, name, {}, error=f"arguments are not a JSON object: {arguments[:200]!r}")
    return ToolCall(call_id, name, args)


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    return Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))
