"""A tiny MCP server over stdio for the tests: newline-delimited JSON-RPC 2.0, no SDK.

Tools: ``add`` (two integers), ``shout`` (upper-cases text), ``fail`` (answers with
``isError``), and three that misbehave: ``crash`` (exits mid-call), ``garbage`` (writes a
line that is not JSON), ``hang`` (never answers). ``tools/list`` pages two tools at a time.

Flags: ``--noisy`` writes 256 KiB to stderr first (more than a pipe holds, so a client
that does not drain stderr stalls it); ``--stubborn`` ignores SIGTERM and stdin closing;
``--silent`` never answers anything; ``--pid-file PATH`` writes its pid there.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import Any

TOOLS: list[dict[str, Any]] = [
    {
        "name": "add",
        "description": "Add two integers.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
    {
        "name": "shout",
        "description": "Say the text in capitals.",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string"}},
            "required": ["text"],
            "additionalProperties": False,
        },
    },
    {"name": "fail", "description": "Always fails.", "inputSchema": {"type": "object", "properties": {}}},
    {"name": "crash", "description": "Exits mid-call.", "inputSchema": {"type": "object"}},
    {"name": "garbage", "description": "Writes a line that is not JSON.", "inputSchema": {"type": "object"}},
    {"name": "hang", "description": "Never answers.", "inputSchema": {"type": "object"}},
]
PAGE = 2


def send(msg: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(msg) + "\n")
    sys.stdout.flush()


def text(value: str, error: bool = False) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": value}], "isError": error}


def call(name: str, args: dict[str, Any]) -> dict[str, Any] | None:
    if name == "add":
        return text(str(args["a"] + args["b"]))
    if name == "shout":
        return {"content": [{"type": "text", "text": args["text"].upper()}, {"type": "text", "text": "!"}]}
    if name == "fail":
        return text("the disk is full", error=True)
    if name == "crash":
        print("crashing on purpose", file=sys.stderr, flush=True)
        sys.exit(3)
    if name == "garbage":
        sys.stdout.write("this is not json\n")
        sys.stdout.flush()
        return None
    if name == "hang":
        return None
    raise KeyError(name)


def main(argv: list[str]) -> None:
    if "--noisy" in argv:
        for i in range(4096):
            sys.stderr.write(f"log line {i:05d} " + "x" * 50 + "\n")
        sys.stderr.flush()
    if "--stubborn" in argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--pid-file" in argv:
        with open(argv[argv.index("--pid-file") + 1], "w") as f:
            f.write(str(__import__("os").getpid()))
    silent = "--silent" in argv
    for line in sys.stdin:
        if silent:
            continue
        msg = json.loads(line)
        method, rid = msg.get("method"), msg.get("id")
        if rid is None:
            continue  # a notification
        params = msg.get("params") or {}
        if method == "initialize":
            send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": "info", "data": "hi"},
                }
            )
            result: dict[str, Any] | None = {
                "protocolVersion": params.get("protocolVersion"),
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "test-server", "version": "1.0"},
            }
        elif method == "tools/list":
            start = int(params.get("cursor") or 0)
            result = {"tools": TOOLS[start : start + PAGE]}
            if start + PAGE < len(TOOLS):
                result["nextCursor"] = str(start + PAGE)
        elif method == "tools/call":
            try:
                result = call(params["name"], params.get("arguments") or {})
            except KeyError as exc:
                send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32602, "message": f"unknown {exc}"}})
                continue
            if result is None:
                continue
        else:
            send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no such method"}})
            continue
        send({"jsonrpc": "2.0", "id": rid, "result": result})
    if "--stubborn" in argv:
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1:])
