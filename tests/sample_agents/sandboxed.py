"""An agent whose tools run sandboxed, each telling what it finds inside (used by
tests/test_sandbox.py, in-process and started with `mesh run`)."""

from __future__ import annotations

import ctypes
import os
import resource
import socket
import time
from pathlib import Path

import msgspec

from mesh import Agent, Context, Message, message
from mesh.llm.sandbox import Sandbox


class Probe(msgspec.Struct, frozen=True):
    port: int  # a TCP port on 127.0.0.1 to try to connect to


class Marker(msgspec.Struct, frozen=True):
    path: str  # a file the tool writes its pid to (appends a line, for `count`)


class Nothing(msgspec.Struct, frozen=True):
    pass


@message("test.sbx_ask")
class SbxAsk(Message, frozen=True):
    text: str


@message("test.sbx_answered")
class SbxAnswered(Message, frozen=True):
    outputs: list[str]
    errors: list[str]


@message("test.sbx_ping")
class SbxPing(Message, frozen=True):
    marker: str  # the blocking tool's pid file


@message("test.sbx_pong")
class SbxPong(Message, frozen=True):
    tool_pid: int  # the pid the blocking tool wrote, and whether it was alive as this was sent
    tool_alive: bool


LIMITS = Sandbox(cpu_seconds=3, memory_mb=256, open_files=32, processes=0, env=["PATH", "SBX_VISIBLE"])
agent = Agent("sandboxed", description="Tools that run out of process")


def _write_pid(path: str) -> None:
    Path(path).write_text(str(os.getpid()))


def _append(path: str) -> int:
    with open(path, "a") as f:
        f.write("ran\n")
    return len(Path(path).read_text().splitlines())


def _pid_in(path: str) -> int:
    file = Path(path)
    return int(file.read_text() or 0) if file.exists() else 0


def _reach(port: int) -> str:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError as exc:
        return f"refused: {type(exc).__name__}: {exc}"
    return "connected"


@agent.tool(sandbox=LIMITS)
async def probe(args: Probe) -> dict[str, object]:
    """Report the rlimits, environment, directory and network seen inside the sandbox."""
    from mesh.llm import sandbox_worker

    return {
        "pid": os.getpid(),
        "cpu": resource.getrlimit(resource.RLIMIT_CPU),
        "memory": resource.getrlimit(resource.RLIMIT_AS),
        "open_files": resource.getrlimit(resource.RLIMIT_NOFILE),
        "processes": resource.getrlimit(resource.RLIMIT_NPROC),
        "env": dict(os.environ),
        "cwd": os.getcwd(),
        "cwd_entries": os.listdir("."),
        "network": _reach(args.port),
        "isolation": sandbox_worker.ISOLATION,
    }


@agent.tool(sandbox=Sandbox(network=True))
async def probe_online(args: Probe) -> str:
    """Try the network from a sandbox that allows it."""
    return _reach(args.port)


@agent.tool(timeout=5, sandbox=True)
async def block(args: Marker) -> str:
    """Write its pid, then block the whole process (not just a coroutine) for 30 s."""
    _write_pid(args.path)
    time.sleep(30)  # noqa: ASYNC251 - blocking on purpose: the sandbox must cope
    return "woke up"


@agent.tool(timeout=0.5, sandbox=True)
async def block_briefly(args: Marker) -> str:
    """The same with a timeout of half a second."""
    _write_pid(args.path)
    time.sleep(30)  # noqa: ASYNC251 - blocking on purpose: the sandbox must cope
    return "woke up"


@agent.tool(sandbox=True)
async def crash(args: Nothing) -> str:
    """Read address 0: the process dies of SIGSEGV."""
    return str(ctypes.string_at(0))


@agent.tool(sandbox=Sandbox(cpu_seconds=1))
async def spin(args: Nothing) -> str:
    """Burn CPU forever."""
    while True:
        pass


@agent.tool(sandbox=Sandbox(memory_mb=200))
async def hog(args: Nothing) -> str:
    """Ask for more memory than the sandbox allows."""
    return str(len(bytearray(400 * 1024 * 1024)))


@agent.tool(sandbox=True)
async def count(args: Marker) -> str:
    """Append a line to a file; say how many it has."""
    return f"{_append(args.path)} run(s)"


@agent.handler(events=False)
async def on_ask(ask: SbxAsk, ctx: Context) -> SbxAnswered:
    run = await ctx.run_tools(system="You test sandboxes.", prompt=ask.text)
    return SbxAnswered(
        outputs=[c.output for c in run.calls if c.ok],
        errors=[f"{c.tool}:{c.error_kind}:{c.output}" for c in run.calls if not c.ok],
    )


@agent.handler(events=False)
async def on_ping(ping: SbxPing, ctx: Context) -> SbxPong:
    pid = _pid_in(ping.marker)
    alive = False
    if pid:
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            pass
    return SbxPong(tool_pid=pid, tool_alive=alive)
