"""Sandboxed tools: a tool run out of the agent's process, with limits.

    @agent.tool(timeout=5, sandbox=Sandbox(cpu_seconds=2, memory_mb=256, env=["PATH"]))
    async def run_query(args: Query) -> str: ...

Each call of a sandboxed tool starts a worker process (``python -I -m
mesh.llm.sandbox_worker``) in its own session and process group, with an environment
holding only the variables the sandbox names (their values taken from the agent's), in a
fresh temporary directory that is removed afterwards. The worker imports the tool's module
(by name, or by file for agents loaded from a path), leaves the network unless the
sandbox allows it, sets its rlimits and calls the function; arguments go in and the result
comes back as JSON on its stdin and stdout. The agent only awaits the process: a tool that
blocks or runs away stalls nothing else, and at its timeout the whole process group gets
SIGKILL. A worker that dies (a crash, a limit) is a `ToolFailed` that says how it died.

``approval=True`` tools run sandboxed unless they say ``sandbox=False``, and MCP servers
are started under `Sandbox.server()` limits unless given ``sandbox=False`` (mesh.llm.mcp).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from mesh.llm.tools import ToolFailed
from mesh.wire.errors import RegistrationError

WORKER = (sys.executable, "-I", "-m", "mesh.llm.sandbox_worker")
OUTPUT_LIMIT = 16 * 1024 * 1024  # bytes of result a worker may write


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What the worker enforces on itself (the wire form of a `Sandbox`, minus the env)."""

    cpu_seconds: int | None = None
    memory_mb: int | None = None
    open_files: int | None = None
    processes: int | None = None
    network: bool = False
    namespaces: bool = True  # False: skip the network namespace, use the in-process fallback


class CallRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What the agent sends a worker: where the tool is, its arguments, its limits."""

    module: str
    file: str
    qualname: str
    sys_path: list[str]
    args: msgspec.Raw
    limits: Limits


class CallResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker answers: the tool's output as text, or why it failed."""

    ok: bool
    output: str = ""
    error: str = ""
    isolation: str = ""  # how the network was kept out: namespace, user-namespace, audit-hook, none


@dataclass(frozen=True, slots=True)
class Sandbox:
    """Where and how a tool runs out of process. ``None`` for a limit: not limited.

    ``cpu_seconds``: RLIMIT_CPU (SIGXCPU at the limit, SIGKILL a second later).
    ``memory_mb``: RLIMIT_AS, the address space. ``open_files``: RLIMIT_NOFILE.
    ``processes``: RLIMIT_NPROC; the kernel counts it per user and counts threads, so 0
    (no new processes or threads) or None are the meaningful values; root is exempt.
    ``env``: names of the agent's environment variables the tool sees; nothing else is
    passed. ``network``: False keeps the tool in an empty network namespace (see
    mesh.llm.sandbox_worker for the fallback where namespaces are not permitted).
    """

    cpu_seconds: int | None = 10
    memory_mb: int | None = 512
    open_files: int | None = 64
    processes: int | None = 0
    env: Sequence[str] = ("PATH",)
    network: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "env", tuple(self.env))  # a list is welcome, kept as a tuple
        for name in ("cpu_seconds", "memory_mb", "open_files", "processes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise RegistrationError(f"Sandbox({name}={value!r}): give a whole number >= 0, or None")

    @classmethod
    def server(cls, *, env: Iterable[str] = ("PATH",), network: bool = False) -> Sandbox:
        """Defaults for a long-lived MCP server: no CPU-seconds limit (they add up over its
        life), 1 GiB of address space, 256 open files, no process limit."""
        return cls(
            cpu_seconds=None, memory_mb=1024, open_files=256, processes=None, env=tuple(env), network=network
        )

    def limits(self, *, namespaces: bool = True) -> Limits:
        return Limits(
            cpu_seconds=self.cpu_seconds,
            memory_mb=self.memory_mb,
            open_files=self.open_files,
            processes=self.processes,
            network=self.network,
            namespaces=namespaces,
        )

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The worker's whole environment: the named variables the agent has, then `extra`."""
        env = {k: os.environ[k] for k in self.env if k in os.environ}
        env.update(extra or {})
        return env

    def describe(self) -> dict[str, Any]:
        return {
            "cpu_seconds": self.cpu_seconds,
            "memory_mb": self.memory_mb,
            "open_files": self.open_files,
            "processes": self.processes,
            "network": self.network,
            "env": list(self.env),
        }


def resolve(sandbox: Sandbox | bool | None, approval: bool) -> Sandbox | None:
    """The sandbox a tool runs in: as given, `Sandbox()` for True, and by default one for
    tools that need a person's approval (the ones marked high-risk)."""
    if sandbox is None:
        sandbox = approval
    if sandbox is True:
        return Sandbox()
    return sandbox or None


def sandboxed(
    fn: Callable[..., Awaitable[Any]], tool: str, sandbox: Sandbox
) -> Callable[[Any], Awaitable[str]]:
    """A runner calling `fn` in a worker: `fn` must be importable there, so it must be a
    module-level function of a module with a name or a file."""
    module = sys.modules.get(fn.__module__)
    qualname = fn.__qualname__
    file = str(getattr(module, "__file__", "") or "")
    if "<locals>" in qualname or module is None or (fn.__module__ == "__main__" and not file):
        raise RegistrationError(
            f"tool {tool!r}: a sandboxed tool runs in a worker that imports it, so define it at the "
            "top level of a module (or pass sandbox=False to run it in the agent's process)"
        )

    async def call(value: Any) -> str:
        request = CallRequest(
            module=fn.__module__,
            file=file,
            qualname=qualname,
            sys_path=[p for p in sys.path if p],
            args=msgspec.Raw(msgspec.json.encode(value)),
            limits=sandbox.limits(namespaces=NAMESPACES),
        )
        return await run_worker(tool, sandbox, request)

    return call


NAMESPACES = True  # False: workers skip the network namespace (to exercise the fallback)


async def run_worker(tool: str, sandbox: Sandbox, request: CallRequest) -> str:
    """Start a worker for `request`, give it the request, and return the tool's output.
    Cancelled (the tool's timeout), the worker's process group is killed before this
    returns; any process the tool left behind is killed too."""
    workdir = tempfile.mkdtemp(prefix=f"mesh-tool-{tool}-")
    try:
        proc = await asyncio.create_subprocess_exec(
            *WORKER,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=sandbox.environment(),
            cwd=workdir,
            start_new_session=True,  # its own process group, killed whole
            limit=OUTPUT_LIMIT,
        )
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise ToolFailed(tool, f"its sandbox process could not be started: {exc}") from None
    try:
        out, err = await proc.communicate(msgspec.json.encode(request))
    finally:
        kill_group(proc.pid)
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())
        shutil.rmtree(workdir, ignore_errors=True)
    return _outcome(tool, sandbox, proc.returncode, out, err)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _outcome(tool: str, sandbox: Sandbox, code: int | None, out: bytes, err: bytes) -> str:
    try:
        result = msgspec.json.decode(out, type=CallResult) if out.strip() else None
    except msgspec.DecodeError:
        result = None
    if result is not None and result.ok:
        return result.output
    if result is not None:
        hint = ""
        if "MemoryError" in result.error and sandbox.memory_mb is not None:
            hint = f" (its sandbox allows {sandbox.memory_mb} MB of address space)"  # RLIMIT_AS
        raise ToolFailed(tool, f"{result.error}{hint}")
    raise ToolFailed(tool, f"its sandbox process {_death(sandbox, code)}{_tail(err)}")


def _death(sandbox: Sandbox, code: int | None) -> str:
    if code is None or code >= 0:
        return f"exited with code {code} without a result"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"died of signal {-code}"
    if -code == signal.SIGXCPU:
        return f"was stopped by SIGXCPU: it used up its CPU limit of {sandbox.cpu_seconds}s"
    if -code == signal.SIGKILL:
        return "was killed by SIGKILL (past its CPU hard limit, or by the out-of-memory killer)"
    return f"died of {name}"


def _tail(err: bytes, lines: int = 5) -> str:
    text = err.decode(errors="replace").strip().splitlines()[-lines:]
    return f"; stderr: {' | '.join(t.strip()[:300] for t in text)}" if text else ""


def exec_command(command: Sequence[str], sandbox: Sandbox) -> list[str]:
    """`command` started through a worker that applies `sandbox` and then execs it (for MCP
    servers). The program is found on the agent's PATH: the sandbox may have none."""
    program = shutil.which(command[0]) or command[0]
    limits = msgspec.json.encode(sandbox.limits(namespaces=NAMESPACES)).decode()
    return [*WORKER, "--exec", limits, "--", program, *command[1:]]
