"""LLM providers: Claude through the real `anthropic` SDK and an OpenAI-compatible endpoint
through httpx, each against a local server on loopback; and the offline default."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from llm_servers import ChatCompletionsAPI, MessagesAPI, Script, serve

from mesh.llm import (
    AnthropicLLM,
    Delta,
    LLMError,
    OfflineLLM,
    OpenAICompatLLM,
    Reply,
    Request,
    Router,
    Text,
    ToolCall,
    ToolOutput,
    ToolSpec,
    Turn,
    make_llm,
)
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

LOOKUP = ToolSpec(
    name="lookup_order",
    description="Find an order",
    input_schema={"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
)


@pytest.fixture
def anthropic_script() -> Script:
    return Script()


@pytest.fixture
def messages_api(anthropic_script: Script) -> Iterator[str]:
    with serve(MessagesAPI, anthropic_script) as url:
        yield url


@pytest.fixture
def openai_script() -> Script:
    return Script()


@pytest.fixture
def openai_api(openai_script: Script) -> Iterator[str]:
    with serve(ChatCompletionsAPI, openai_script) as url:
        yield url + "/v1"


async def collect(llm: object, request: Request) -> tuple[list[str], Reply]:
    deltas: list[str] = []
    final = None
    async for event in llm.stream(request):  # type: ignore[attr-defined]
        if isinstance(event, Delta):
            deltas.append(event.text)
        else:
            final = event
    assert final is not None
    return deltas, final


# ---------------------------------------------------------------- anthropic


async def test_anthropic_provider_speaks_the_messages_api(
    messages_api: str, anthropic_script: Script
) -> None:
    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    text = await llm.complete(system="be brief", prompt="hello", max_tokens=10)
    assert text == "echo: hello"
    [req] = anthropic_script.requests
    assert req["path"] == "/v1/messages"
    assert "sk-test" in req["key"]
    assert req["body"]["system"] == "be brief"
    assert req["body"]["max_tokens"] == 10
    assert req["body"]["model"] == "claude-test"


async def test_anthropic_errors_become_typed_llm_errors(messages_api: str, anthropic_script: Script) -> None:
    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    anthropic_script.steps = ["400", "429", "529"]
    with pytest.raises(LLMError, match="anthropic:claude-test: HTTP 400") as bad:
        await llm.complete(system="s", prompt="p")
    assert not bad.value.retryable
    for status in (429, 529):
        with pytest.raises(LLMError) as err:
            await llm.complete(system="s", prompt="p")
        assert err.value.retryable and err.value.status == status


async def test_anthropic_tool_use_turn_and_tool_result(messages_api: str, anthropic_script: Script) -> None:
    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    anthropic_script.steps = ["tool", "text"]
    first = await llm.chat(Request(system="s", messages=[Turn.user("where is A-1?")], tools=[LOOKUP]))
    assert first.stop_reason == "tool_use"
    assert first.tool_calls == [ToolCall(id="toolu_1", name="lookup_order", input={"order_id": "A-1"})]
    assert first.usage.input_tokens == 11 and first.usage.output_tokens == 7
    turns = [
        Turn.user("where is A-1?"),
        Turn("assistant", list(first.content)),
        Turn("user", [ToolOutput("toolu_1", "shipped"), Text("go on")]),
    ]
    second = await llm.chat(Request(system="s", messages=turns, tools=[LOOKUP]))
    assert second.text == "echo: go on"
    sent = anthropic_script.requests[1]["body"]
    assert sent["tools"][0]["input_schema"] == LOOKUP.input_schema
    assert sent["messages"][1]["content"][0]["type"] == "tool_use"
    assert sent["messages"][2]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": "shipped",
        "is_error": False,
    }


async def test_anthropic_streams_text_deltas_over_sse(messages_api: str, anthropic_script: Script) -> None:
    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    deltas, final = await collect(llm, Request(messages=[Turn.user("a streamed answer")]))
    assert len(deltas) == 2
    assert "".join(deltas) == final.text == "echo: a streamed answer"
    assert final.usage.output_tokens == 7
    assert anthropic_script.requests[0]["body"]["stream"] is True


async def test_anthropic_streams_a_tool_call(messages_api: str, anthropic_script: Script) -> None:
    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    anthropic_script.steps = ["tool"]
    deltas, final = await collect(llm, Request(messages=[Turn.user("x")], tools=[LOOKUP]))
    assert deltas == []
    assert final.tool_calls[0].input == {"order_id": "A-1"}


async def test_router_retries_429_and_529_then_succeeds(messages_api: str, anthropic_script: Script) -> None:
    anthropic_script.steps = ["429", "529"]
    delays: list[float] = []

    async def sleep(seconds: float) -> None:
        delays.append(seconds)

    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    router = Router([llm], retries=2, backoff_base=0.5, sleep=sleep, rng=lambda: 1.0)
    assert await router.complete(system="s", prompt="third time") == "echo: third time"
    assert len(anthropic_script.requests) == 3
    assert delays == [0.5, 1.0]  # exponential; the jitter factor is fixed at 1 here


async def test_slow_provider_times_out_and_the_router_falls_back(
    messages_api: str, anthropic_script: Script
) -> None:
    anthropic_script.steps = ["slow"]

    async def sleep(seconds: float) -> None:
        pass

    slow = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    router = Router([slow, OfflineLLM()], retries=0, timeout=0.3, sleep=sleep)
    reply = await router.chat(Request(messages=[Turn.user("Fall back to me.")]))
    assert reply.provider == "offline"
    assert reply.text == "Fall back to me."


async def test_router_streams_from_the_fallback_when_the_first_fails(
    messages_api: str, anthropic_script: Script
) -> None:
    anthropic_script.steps = ["500"]

    async def sleep(seconds: float) -> None:
        pass

    first = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    router = Router([first, OfflineLLM()], retries=0, sleep=sleep)
    deltas, final = await collect(router, Request(messages=[Turn.user("Streamed offline words.")]))
    assert final.provider == "offline"
    assert "".join(deltas) == final.text == "Streamed offline words."


# ---------------------------------------------------------------- openai-compatible


async def test_openai_compatible_chat_and_tools(openai_api: str, openai_script: Script) -> None:
    llm = OpenAICompatLLM("llama-test", base_url=openai_api, api_key="k")
    openai_script.steps = ["text", "tool", "bad_tool"]
    assert await llm.complete(system="s", prompt="hi") == "echo: hi"
    req = openai_script.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["key"] == "Bearer k"
    assert req["body"]["messages"][0] == {"role": "system", "content": "s"}
    tool = await llm.chat(Request(messages=[Turn.user("x")], tools=[LOOKUP]))
    assert tool.stop_reason == "tool_use"
    assert tool.tool_calls == [ToolCall("call_1", "lookup_order", {"order_id": "A-1"})]
    assert openai_script.requests[1]["body"]["tools"][0]["function"]["parameters"] == LOOKUP.input_schema
    bad = await llm.chat(Request(messages=[Turn.user("x")], tools=[LOOKUP]))
    assert bad.tool_calls[0].error.startswith("arguments are not JSON")
    await llm.aclose()


async def test_openai_compatible_streaming(openai_api: str, openai_script: Script) -> None:
    llm = OpenAICompatLLM("llama-test", base_url=openai_api)
    deltas, final = await collect(llm, Request(messages=[Turn.user("stream me")]))
    assert deltas == ["echo: s", "tream me"]
    assert final.text == "echo: stream me" and final.usage.input_tokens == 13
    openai_script.steps = ["tool"]
    _, final = await collect(llm, Request(messages=[Turn.user("x")], tools=[LOOKUP]))
    assert final.tool_calls == [ToolCall("call_1", "lookup_order", {"order_id": "A-1"})]
    await llm.aclose()


async def test_openai_compatible_errors_are_typed(openai_api: str, openai_script: Script) -> None:
    llm = OpenAICompatLLM("llama-test", base_url=openai_api)
    openai_script.steps = ["429", "400"]
    with pytest.raises(LLMError) as err:
        await llm.complete(system="s", prompt="p")
    assert err.value.retryable and err.value.status == 429
    with pytest.raises(LLMError) as err:
        await llm.complete(system="s", prompt="p")
    assert not err.value.retryable
    await llm.aclose()


# ---------------------------------------------------------------- offline


async def test_offline_model_is_deterministic() -> None:
    llm = OfflineLLM()
    a = await llm.complete(system="s", prompt="The export fails with error 500")
    assert a == await llm.complete(system="s", prompt="The export fails with error 500")
    assert a != await llm.complete(system="s", prompt="Something else entirely")
    assert "export fails" in a


async def test_offline_model_answers_with_the_bullets_of_the_prompt() -> None:
    text = await OfflineLLM().complete(
        system="s", prompt="Customer: Ada\n\nNotes:\n- First fact\n- Second fact."
    )
    assert text == "First fact. Second fact."


async def test_offline_model_calls_the_tools_it_is_told_to_then_answers() -> None:
    llm = OfflineLLM()
    turns = [Turn.user('Please call lookup_order({"order_id": "A-1"}) for me.')]
    first = await llm.chat(Request(messages=turns, tools=[LOOKUP]))
    assert first.tool_calls == [ToolCall("call_1", "lookup_order", {"order_id": "A-1"})]
    turns += [
        Turn("assistant", list(first.content)),
        Turn("user", [ToolOutput("call_1", "Shipped on Monday")]),
    ]
    second = await llm.chat(Request(messages=turns, tools=[LOOKUP]))
    assert second.tool_calls == []
    assert second.text.endswith("Shipped on Monday.")
    no_tools = await llm.chat(Request(messages=turns[:1]))
    assert no_tools.tool_calls == []


def test_provider_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert make_llm(Settings.load(environ={})).name == "offline"
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        make_llm(Settings.load(environ={"MESH_LLM": "anthropic"}))
    with pytest.raises(ConfigError, match="MESH_OPENAI_BASE_URL"):
        make_llm(Settings.load(environ={"MESH_LLM": "openai"}))
    openai = make_llm(Settings.load(environ={"MESH_OPENAI_BASE_URL": "http://127.0.0.1:9/v1"}))
    assert openai.name == "openai:llama3.1"
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert make_llm(Settings.load(environ={})).name == "anthropic:claude-sonnet-4-5"
    assert make_llm(Settings.load(environ={"MESH_LLM": "offline"})).name == "offline"
    both = make_llm(Settings.load(environ={"MESH_LLM_FALLBACK": "offline"}))
    assert [p.name for p in both.providers] == ["anthropic:claude-sonnet-4-5", "offline"]
    with pytest.raises(ConfigError, match="unknown model provider"):
        make_llm(Settings.load(environ={"MESH_LLM_FALLBACK": "gpt"}))


async def test_router_retries_an_openai_compatible_stream_that_failed_before_its_first_piece(
    openai_api: str, openai_script: Script
) -> None:
    openai_script.steps = ["429"]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    llm = OpenAICompatLLM("llama-test", base_url=openai_api)
    router = Router([llm], retries=1, backoff_base=0.5, sleep=sleep, rng=lambda: 1.0)
    deltas, final = await collect(router, Request(messages=[Turn.user("stream me")]))
    assert "".join(deltas) == final.text == "echo: stream me"
    assert len(waits) == 1 and len(openai_script.requests) == 2  # one 429, one stream
    assert openai_script.requests[1]["body"]["stream"] is True
    await llm.aclose()
