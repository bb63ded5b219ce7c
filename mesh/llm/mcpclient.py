"""The MCP stdio transport: a child process spoken to in JSON-RPC 2.0, one JSON object per
line on its stdin and stdout (see mesh.llm.mcp for importing its tools)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import structlog

from mesh.llm.sandbox import Sandbox, exec_command, kill_group
from mesh.llm.tools import Tool, ToolFailed, ToolTimeout
from mesh.wire.errors import RegistrationError

log = structlog.get_logger("mesh.llm.mcp")

PROTOCOL_VERSION = "2025-06-18"
LINE_LIMIT = 16 * 1024 * 1024  # the longest line a server may write
STDERR_TAIL = 20  # lines of the server's stderr kept for error messages
MAX_PAGES = 1000  # of tools/list, against a server that never stops paginating


class MCPError(ToolFailed):
    """An MCP server could not be started, went away, or broke the protocol (kind ``failed``).
    ``tool`` is ``mcp:<server>`` for failures of the server as a whole."""


class MCPTimeout(ToolTimeout):
    """An MCP server did not answer a request in time (kind ``timeout``)."""


def _version() -> str:
    try:
        return metadata.version("mesh")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "0.0.0"


@dataclass
class MCPServer:
    """One MCP server process and the JSON-RPC conversation with it."""

    command: Sequence[str]
    name: str
    timeout: float = 30.0  # per request, unless the request says otherwise
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None
    sandbox: Sandbox | None = None  # the limits it runs under (None: a plain child process)
    tools: list[Tool] = field(default_factory=list)  # what import_tools added
    server_info: dict[str, Any] = field(default_factory=dict)
    protocol_version: str = ""
    _proc: asyncio.subprocess.Process | None = field(default=None, repr=False)
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict, repr=False)
    _next_id: int = field(default=0, repr=False)
    _broken: MCPError | None = field(default=None, repr=False)
    _stderr: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL), repr=False
    )
    _tasks: list[asyncio.Task[None]] = field(default_factory=list, repr=False)
    _write_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _workdir: str = field(default="", repr=False)  # made for a sandboxed server without a cwd

    @property
    def source(self) -> str:
        return f"mcp:{self.name}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def __aenter__(self) -> MCPServer:
        if self._proc is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- process ------------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Start the process and do the `initialize` handshake."""
        if not self.command:
            raise RegistrationError(f"MCP server {self.name!r}: give the command that starts it")
        command, env, cwd = list(self.command), dict(self.env) if self.env is not None else None, self.cwd
        if self.sandbox is not None:
            if shutil.which(command[0]) is None:  # found on the agent's PATH: the sandbox may have none
                raise MCPError(self.source, f"could not start {command}: no executable {command[0]!r} found")
            command, env = exec_command(command, self.sandbox), self.sandbox.environment(self.env)
            if cwd is None:
                cwd = self._workdir = tempfile.mkdtemp(prefix=f"mesh-mcp-{self.name}-")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=cwd,
                limit=LINE_LIMIT,
                start_new_session=self.sandbox is not None,  # its process group is killed whole
            )
        except OSError as exc:
            self._cleanup()
            raise MCPError(self.source, f"could not start {list(self.command)}: {exc}") from None
        self._tasks = [
            asyncio.create_task(self._read_stdout(), name=f"mcp-{self.name}-stdout"),
            asyncio.create_task(self._read_stderr(), name=f"mcp-{self.name}-stderr"),
        ]
        try:
            result = await self.request(
                "initialize",
                {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "mesh", "version": _version()},
                },
                timeout=timeout,
            )
            self.protocol_version = str(result.get("protocolVersion", ""))
            info = result.get("serverInfo")
            self.server_info = info if isinstance(info, dict) else {}
            await self.notify("notifications/initialized")
        except BaseException:
            await self.close()
            raise

    async def close(self, timeout: float = 2.0) -> None:
        """Close stdin and let the server exit; terminate it, then kill it, if it does not
        within ``timeout`` each. Pending requests fail with `MCPError`."""
        self._fail(MCPError(self.source, "the connection to the server was closed"))
        proc = self._proc
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            for step in (None, proc.terminate, proc.kill):
                if step is not None:
                    with contextlib.suppress(ProcessLookupError):
                        step()
                try:
                    async with asyncio.timeout(timeout):
                        await proc.wait()
                    break
                except TimeoutError:
                    continue
            else:  # pragma: no cover - kill always ends a process
                await proc.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                await proc.stdin.wait_closed()
        self._cleanup()

    def _cleanup(self) -> None:
        """A sandboxed server's leftovers: what it started, and the directory made for it."""
        if self.sandbox is not None and self._proc is not None:
            kill_group(self._proc.pid)
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = ""

    def _fail(self, error: MCPError) -> None:
        """Mark the connection unusable and fail every waiting request with ``error``."""
        if self._broken is None:
            self._broken = error
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(self._broken)
        self._pending.clear()

    def _tail(self) -> str:
        return f"; stderr: {' | '.join(self._stderr)}" if self._stderr else ""

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        stream = self._proc.stderr
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: drop what was buffered and go on
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                self._stderr.append(text[:500])

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stream = self._proc.stdout
        while True:
            try:
                line = await stream.readline()
            except ValueError:
                self._fail(MCPError(self.source, f"wrote a line longer than {LINE_LIMIT} bytes"))
                return
            if not line:
                break
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                shown = line.decode(errors="replace").strip()[:200]
                self._fail(MCPError(self.source, f"wrote something that is not JSON-RPC: {shown!r}"))
                return
            if not isinstance(msg, dict):
                self._fail(MCPError(self.source, f"wrote a JSON value that is not a message: {msg!r}"))
                return
            await self._dispatch(msg)
        code = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                code = await self._proc.wait()
        await asyncio.sleep(0)  # let the stderr reader take the last lines
        how = f"exited with code {code}" if code is not None else "closed its stdout"
        self._fail(MCPError(self.source, f"the server {how}{self._tail()}"))

    async def _dispatch(self, msg: dict[str, Any]) -> None:
        if "method" in msg:
            if "id" in msg:  # a request from the server: we offer no client features but ping
                if msg["method"] == "ping":
                    await self._send({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
                else:
                    error = {"code": -32601, "message": f"method {msg['method']!r} not supported"}
                    await self._send({"jsonrpc": "2.0", "id": msg["id"], "error": error})
            return  # notifications (progress, log messages, list changes) are not used
        rid = msg.get("id")
        fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if fut is None or fut.done():
            log.debug("mcp answer to no waiting request", server=self.name, id=msg.get("id"))
            return
        fut.set_result(msg)

    # -- JSON-RPC -----------------------------------------------------------------------

    async def _send(self, msg: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise MCPError(self.source, "the server is not started")
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            async with self._write_lock:
                proc.stdin.write(data)
                await proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            error = MCPError(self.source, f"the server stopped reading its stdin ({exc}){self._tail()}")
            self._fail(error)
            raise (self._broken or error) from None

    def _cancel(self, rid: int, reason: str) -> None:
        """Tell the server a request is abandoned, without waiting (best effort)."""
        proc = self._proc
        if self._broken is not None or proc is None or proc.stdin is None or proc.stdin.is_closing():
            return
        msg = {
            "jsonrpc": "2.0",
            "method": "notifications/cancelled",
            "params": {"requestId": rid, "reason": reason},
        }
        with contextlib.suppress(Exception):
            proc.stdin.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        if self._broken is not None:
            raise self._broken
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        await self._send(msg)

    async def request(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send a request and return its ``result``; `MCPError` for an error answer or a
        broken connection, `MCPTimeout` after ``timeout`` (default: the server's)."""
        if self._broken is not None:
            raise self._broken
        self._next_id += 1
        rid = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        limit = timeout or self.timeout
        try:
            async with asyncio.timeout(limit):
                await self._send(msg)
                answer = await fut
        except TimeoutError:
            self._cancel(rid, "timed out")
            raise MCPTimeout(self.source, f"no answer to {method} within {limit:g}s{self._tail()}") from None
        except asyncio.CancelledError:  # e.g. the tool's own timeout in Tool.run
            self._cancel(rid, "cancelled")
            raise
        finally:
            self._pending.pop(rid, None)
        error = answer.get("error")
        if error is not None:
            detail = error.get("message", error) if isinstance(error, dict) else error
            code = error.get("code") if isinstance(error, dict) else None
            raise MCPError(self.source, f"{method} failed: {detail} (JSON-RPC error {code})")
        result = answer.get("result")
        if not isinstance(result, dict):
            raise MCPError(self.source, f"{method}: the answer has no result object: {answer!r}"[:300])
        return result

    # -- MCP ----------------------------------------------------------------------------

    async def list_tools(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Every tool the server offers, following ``nextCursor`` pages."""
        found: list[dict[str, Any]] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            result = await self.request("tools/list", {"cursor": cursor} if cursor else {}, timeout=timeout)
            page = result.get("tools")
            if not isinstance(page, list):
                raise MCPError(self.source, "tools/list: the answer has no list of tools")
            found.extend(t for t in page if isinstance(t, dict) and isinstance(t.get("name"), str))
            cursor = result.get("nextCursor") or None
            if cursor is None:
                return found
        raise MCPError(self.source, f"tools/list: still paginating after {MAX_PAGES} pages")

    async def call_tool(self, tool: str, arguments: dict[str, Any], timeout: float | None = None) -> str:
        """Call one tool; its text content, or `ToolFailed` with the text if ``isError``."""
        try:
            result = await self.request("tools/call", {"name": tool, "arguments": arguments}, timeout=timeout)
        except MCPTimeout as exc:
            raise MCPTimeout(tool, f"server {self.name!r}: {exc.reason}") from None
        except MCPError as exc:
            raise MCPError(tool, f"server {self.name!r}: {exc.reason}") from None
        text = content_text(result)
        if result.get("isError") is True:
            raise ToolFailed(tool, text or "the server reported an error")
        return text


def content_text(result: Mapping[str, Any]) -> str:
    """The text of a tools/call result: text blocks joined by newlines; other blocks named;
    ``structuredContent`` as JSON when there is no content."""
    parts: list[str] = []
    for block in result.get("content") or []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            parts.append(str(block.get("text", "")))
        elif kind == "resource" and isinstance(block.get("resource"), dict):
            res = block["resource"]
            parts.append(str(res["text"]) if "text" in res else f"[resource {res.get('uri', '')}]")
        elif kind == "resource_link":
            parts.append(f"[resource {block.get('uri', '')}]")
        else:
            parts.append(f"[{kind} {block.get('mimeType', '')}]".replace(" ]", "]"))
    if not parts and "structuredContent" in result:
        return json.dumps(result["structuredContent"], separators=(",", ":"))
    return "\n".join(parts)
