"""LLM providers: the offline default, and Claude through the real `anthropic` SDK against a
local HTTP server that speaks the Messages API."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from mesh.errors import ConfigError
from mesh.llm import AnthropicLLM, LLMError, OfflineLLM, make_llm
from mesh.settings import Settings


class FakeMessagesAPI(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]] = []
    status = 200

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        FakeMessagesAPI.requests.append(
            {
                "path": self.path,
                "body": body,
                "key": self.headers.get("x-api-key") or self.headers.get("authorization"),
            }
        )
        if self.status != 200:
            payload = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad model"}}
        else:
            prompt = body["messages"][0]["content"]
            payload = {
                "id": "msg_test",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": f"echo: {prompt}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 2},
            }
        data = json.dumps(payload).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def messages_api() -> Iterator[str]:
    FakeMessagesAPI.requests = []
    FakeMessagesAPI.status = 200
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeMessagesAPI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_anthropic_provider_speaks_the_messages_api(messages_api: str) -> None:
    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    text = await llm.complete(system="be brief", prompt="hello", max_tokens=10)
    assert text == "echo: hello"
    [req] = FakeMessagesAPI.requests
    assert req["path"] == "/v1/messages"
    assert "sk-test" in req["key"]
    assert req["body"]["system"] == "be brief"
    assert req["body"]["max_tokens"] == 10
    assert req["body"]["model"] == "claude-test"


async def test_anthropic_errors_become_llm_errors(messages_api: str) -> None:
    FakeMessagesAPI.status = 400
    llm = AnthropicLLM("claude-test", api_key="sk-test", base_url=messages_api)
    with pytest.raises(LLMError, match="anthropic:claude-test: BadRequestError"):
        await llm.complete(system="s", prompt="p")


async def test_offline_model_is_deterministic() -> None:
    llm = OfflineLLM()
    a = await llm.complete(system="s", prompt="The export fails with error 500")
    assert a == await llm.complete(system="s", prompt="The export fails with error 500")
    assert a != await llm.complete(system="s", prompt="Something else entirely")
    assert "export fails" in a


def test_provider_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert make_llm(Settings.load(environ={})).name == "offline"
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY"):
        make_llm(Settings.load(environ={"MESH_LLM": "anthropic"}))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    assert make_llm(Settings.load(environ={})).name == "anthropic:claude-sonnet-4-5"
    assert make_llm(Settings.load(environ={"MESH_LLM": "offline"})).name == "offline"


async def test_offline_model_answers_with_the_bullets_of_the_prompt() -> None:
    text = await OfflineLLM().complete(
        system="s", prompt="Customer: Ada\n\nNotes:\n- First fact\n- Second fact."
    )
    assert text == "First fact. Second fact."
