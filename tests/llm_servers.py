"""Local HTTP servers on loopback that speak the Anthropic Messages API and the OpenAI chat
completions API, driven by a script of what to do on each request."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Script:
    """What the server answers, request by request: ``text``, ``tool``, ``bad_tool``,
    ``429``, ``529``, ``500``, ``400`` or ``slow`` (held until the test ends). When the
    script runs out, every request gets ``text``."""

    steps: list[str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def next(self) -> str:
        return self.steps.pop(0) if self.steps else "text"


def _last_user_text(body: dict[str, Any]) -> str:
    for msg in reversed(body.get("messages", [])):
        if msg["role"] != "user":
            continue
        content = msg["content"]
        if isinstance(content, str):
            return content
        texts = [b.get("text", "") for b in content if b.get("type") == "text"]
        if texts:
            return "".join(texts)
    return ""


class _Base(BaseHTTPRequestHandler):
    script: Script

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: list[tuple[str, dict[str, Any] | str]]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        for name, data in events:
            text = data if isinstance(data, str) else json.dumps(data)
            prefix = f"event: {name}\n" if name else ""
            self.wfile.write(f"{prefix}data: {text}\n\n".encode())
            self.wfile.flush()

    def _read(self) -> tuple[str, dict[str, Any]]:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.script.requests.append(
            {
                "path": self.path,
                "body": body,
                "key": self.headers.get("x-api-key") or self.headers.get("authorization"),
            }
        )
        step = self.script.next()
        if step == "slow":
            self.script.release.wait(30)
        return step, body


class MessagesAPI(_Base):
    def do_POST(self) -> None:
        step, body = self._read()
        errors = {"429": "rate_limit_error", "529": "overloaded_error", "500": "api_error"}
        if step in errors or step == "400":
            kind = errors.get(step, "invalid_request_error")
            self._json(int(step), {"type": "error", "error": {"type": kind, "message": f"scripted {step}"}})
            return
        if step == "tool":
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": "toolu_1",
                "name": "lookup_order",
                "input": {"order_id": "A-1"},
            }
        else:
            block = {"type": "text", "text": f"echo: {_last_user_text(body)}"}
        message = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [block],
            "stop_reason": "tool_use" if step == "tool" else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 11, "output_tokens": 7},
        }
        if not body.get("stream"):
            self._json(200, message)
            return
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": 11, "output_tokens": 0},
        }
        events: list[tuple[str, dict[str, Any] | str]] = [
            ("message_start", {"type": "message_start", "message": start})
        ]
        if block["type"] == "text":
            events.append(
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
            )
            text = block["text"]
            for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
                delta = {"type": "text_delta", "text": piece}
                events.append(
                    ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
                )
        else:
            empty = {**block, "input": {}}
            events.append(
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": empty})
            )
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": 7},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        self._sse(events)


class ChatCompletionsAPI(_Base):
    def do_POST(self) -> None:
        step, body = self._read()
        if step in ("429", "529", "500", "400"):
            self._json(int(step), {"error": {"message": f"scripted {step}", "type": "server_error"}})
            return
        model = body["model"]
        usage = {"prompt_tokens": 13, "completion_tokens": 5, "total_tokens": 18}
        if step in ("tool", "bad_tool"):
            args = '{"order_id": "A-1"}' if step == "tool" else '{"order_id": '
            call = {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": args},
            }
            message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [call]}
            finish = "tool_calls"
        else:
            message = {"role": "assistant", "content": f"echo: {_last_user_text(body)}"}
            finish = "stop"
        if not body.get("stream"):
            self._json(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
                },
            )
            return
        chunks: list[dict[str, Any]] = []
        if message.get("content"):
            text = message["content"]
            for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
                chunks.append({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        else:
            fn = message["tool_calls"][0]["function"]
            first = {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            chunks.append(
                {"choices": [{"index": 0, "delta": {"tool_calls": [first]}, "finish_reason": None}]}
            )
            half = len(fn["arguments"]) // 2
            for piece in (fn["arguments"][:half], fn["arguments"][half:]):
                part = {"index": 0, "function": {"arguments": piece}}
                chunks.append(
                    {"choices": [{"index": 0, "delta": {"tool_calls": [part]}, "finish_reason": None}]}
                )
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        chunks.append({"choices": [], "usage": usage})
        self._sse([("", {"id": "chatcmpl-1", "model": model, **c}) for c in chunks] + [("", "[DONE]")])


@contextmanager
def serve(handler: type[_Base], script: Script) -> Iterator[str]:
    """Serve `handler` on a free loopback port; yields its base URL."""
    cls = type(handler.__name__, (handler,), {"script": script})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), cls)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        script.release.set()
        httpd.shutdown()
        httpd.server_close()
