"""Tools from MCP servers, over the stdio transport.

    server = await mcp.import_tools(
        agent.tools, ["python", "-m", "files_server"], name="files",
        allow=["read_file", "write_file"], permissions=["files:read"], approval=["write_file"],
        timeout=10,
    )
    ...
    await server.close()

or declared, to be imported when the agent starts and closed when it stops:

    agent.mcp_server(["python", "-m", "files_server"], name="files", allow=["read_file"])

`import_tools` starts the server as a child process, speaks JSON-RPC 2.0 with it as one
JSON object per line on its stdin and stdout (the MCP stdio transport), lists its tools and
adds each one to the toolbox as a `Tool` with ``source="mcp:<name>"``. The model sees the
server's own input schema; arguments are checked against it (`mesh.llm.tools._check_schema`)
before the call goes to the server. A name already in the toolbox is a `RegistrationError`
unless ``prefix=True``, which names the tools ``<name>_<tool>``.

The server runs sandboxed by default (mesh.llm.sandbox): its environment holds only the
variables its `Sandbox` names (PATH by default) plus ``env``, it has no network, and
`Sandbox.server()` rlimits; its directory is ``cwd``, or a fresh one removed when it
closes. ``sandbox=False`` starts it as a plain child of the agent, with its environment.

A server that exits, writes something that is not JSON, or does not answer in time gives
an `MCPError` (a `ToolError`, so a `MeshError`) saying which and with the end of its
stderr; nothing waits forever. A call answered with ``isError: true`` is a `ToolFailed`
with the server's text.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from mesh.llm.mcpclient import MCPError, MCPServer, MCPTimeout, content_text
from mesh.llm.sandbox import Sandbox
from mesh.llm.tools import Tool, Toolbox
from mesh.wire.errors import RegistrationError

log = structlog.get_logger("mesh.llm.mcp")

__all__ = ["Declaration", "Declared", "MCPError", "MCPServer", "MCPTimeout", "content_text", "import_tools"]


def _tool(server: MCPServer, remote: str, local: str, raw: dict[str, Any], **opts: Any) -> Tool:
    schema = raw.get("inputSchema")
    if not isinstance(schema, dict) or schema.get("type", "object") != "object":
        schema = {"type": "object", "properties": {}}
    description = str(
        raw.get("description") or raw.get("title") or f"{remote} (from MCP server {server.name})"
    )
    timeout: float | None = opts["timeout"]

    async def call(args: dict[str, Any]) -> str:
        # Tool.run bounds the call (this tool's timeout, else MESH_TOOL_TIMEOUT); a call it
        # gives up on is cancelled at the server too
        return await server.call_tool(remote, args)

    return Tool(
        name=local,
        description=description,
        input_schema=schema,
        call=call,
        timeout=timeout,
        permissions=opts["permissions"],
        approval=opts["approval"],
        source=server.source,
        sandbox=server.sandbox,
    )


async def import_tools(
    toolbox: Toolbox,
    command: Sequence[str],
    *,
    name: str,
    allow: Iterable[str] | None = None,
    permissions: Iterable[str] = (),
    approval: Iterable[str] = (),
    timeout: float | None = None,
    prefix: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    start_timeout: float = 10.0,
    sandbox: Sandbox | bool = True,
) -> MCPServer:
    """Start the MCP server ``command``, and add its tools to ``toolbox``.

    ``allow``: only these tools (by the server's names; a name the server lacks is an
    error). ``permissions``: what each imported tool requires of the agent.
    ``approval``: tools a person approves each call of. ``timeout``: per call (default
    ``MESH_TOOL_TIMEOUT`` in the tool loop, 30 s otherwise). ``prefix``: name the tools
    ``<name>_<tool>``; without it a name already in the toolbox is a `RegistrationError`.
    ``sandbox``: the limits it runs under (True: `Sandbox.server()`; False: none, and it
    inherits the agent's environment). Nothing is added if anything fails. Returns the running server: ``await
    server.close()`` when the agent stops (its tools then fail with `MCPError`).
    """
    box = Sandbox.server() if sandbox is True else sandbox or None
    server = MCPServer(command, name, timeout=timeout or 30.0, env=env, cwd=cwd, sandbox=box)
    await server.start(timeout=start_timeout)
    try:
        listed = await server.list_tools(timeout=start_timeout)
        by_name = {t["name"]: t for t in listed}
        wanted = list(by_name) if allow is None else list(dict.fromkeys(allow))
        needs_approval = set(approval)
        for what, names in (("allow", wanted), ("approval", needs_approval)):
            missing = sorted(set(names) - set(by_name))
            if missing:
                raise RegistrationError(
                    f"MCP server {name!r}: {what} names {missing}, which it does not offer "
                    f"(it offers {sorted(by_name)})"
                )
        perms = frozenset(permissions)
        tools = [
            _tool(
                server,
                remote,
                f"{name}_{remote}" if prefix else remote,
                by_name[remote],
                timeout=timeout,
                permissions=perms,
                approval=remote in needs_approval,
            )
            for remote in wanted
        ]
        clashes = sorted(t.name for t in tools if t.name in toolbox)
        if clashes:
            raise RegistrationError(
                f"MCP server {name!r}: tool(s) {clashes} already registered; "
                "import with prefix=True to name them "
                f"{name}_<tool>, or leave them out with allow=[...]"
            )
        for tool in tools:
            toolbox.add(tool)
    except BaseException:
        await server.close()
        raise
    server.tools = tools
    log.info("mcp tools imported", server=name, tools=[t.name for t in tools], pid=server.pid)
    return server


@dataclass(frozen=True, slots=True)
class Declaration:
    """An MCP server an agent declared with `Agent.mcp_server`: the arguments of `import_tools`."""

    command: tuple[str, ...]
    name: str
    allow: tuple[str, ...] | None = None
    permissions: tuple[str, ...] = ()
    approval: tuple[str, ...] = ()
    timeout: float | None = None
    prefix: bool = False
    env: Mapping[str, str] | None = None
    cwd: str | os.PathLike[str] | None = None
    start_timeout: float = 10.0
    sandbox: Sandbox | bool = True

    async def open(self, toolbox: Toolbox) -> MCPServer:
        return await import_tools(
            toolbox,
            self.command,
            name=self.name,
            allow=self.allow,
            permissions=self.permissions,
            approval=self.approval,
            timeout=self.timeout,
            prefix=self.prefix,
            env=self.env,
            cwd=self.cwd,
            start_timeout=self.start_timeout,
            sandbox=self.sandbox,
        )


class Opened(Protocol):
    """A declared source of tools, open: the tools it added, and how to close it."""

    tools: list[Tool]

    async def close(self) -> None: ...


class Source(Protocol):
    """Something declared on an agent that adds tools when it starts: an MCP server
    (`Declaration`), a remote A2A agent (mesh.llm.a2a_declared)."""

    @property
    def name(self) -> str: ...

    async def open(self, toolbox: Toolbox) -> Opened: ...


@dataclass
class Declared:
    """An agent's declared tool sources (MCP servers, A2A agents). The runtime attaches when
    an agent starts and detaches when it stops: the sources open with the first replica of
    the agent in a process and close, their tools leaving the toolbox, with the last."""

    specs: list[Source] = field(default_factory=list)
    live: list[Opened] = field(default_factory=list)
    users: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def __bool__(self) -> bool:
        return bool(self.specs)

    def add(self, spec: Source) -> None:
        if any(s.name == spec.name for s in self.specs):
            raise RegistrationError(
                f"a tool source (MCP server, A2A agent) named {spec.name!r} is already declared"
            )
        self.specs.append(spec)

    async def attach(self, toolbox: Toolbox) -> None:
        async with self.lock:
            self.users += 1
            if self.users > 1:
                return
            try:
                for s in self.specs:
                    self.live.append(await s.open(toolbox))
            except BaseException:
                self.users -= 1
                await self._close(toolbox)
                raise

    async def detach(self, toolbox: Toolbox) -> None:
        async with self.lock:
            if self.users == 0:
                return
            self.users -= 1
            if self.users == 0:
                await self._close(toolbox)

    async def _close(self, toolbox: Toolbox) -> None:
        for server in reversed(self.live):
            for tool in server.tools:
                toolbox.remove(tool.name)
            await server.close()
        self.live.clear()
