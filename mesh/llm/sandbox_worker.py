"""The sandbox worker: the process a sandboxed tool runs in (see mesh.llm.sandbox).

    python -I -m mesh.llm.sandbox_worker                 # one tool call, request on stdin
    python -I -m mesh.llm.sandbox_worker --exec LIMITS -- program args...   # an MCP server

The agent starts it with a clean environment, in a fresh directory, in a session of its
own. For a call it reads a `CallRequest` (JSON) from stdin, leaves the network, imports the
tool's module, sets its rlimits, runs the tool and writes a `CallResult` (JSON) to what was
its stdout; whatever the tool prints goes to stderr. With ``--exec`` it leaves the network,
sets the rlimits and replaces itself with the program.

Leaving the network, in order of preference (`ISOLATION` says which is in force):

``namespace``       unshare(CLONE_NEWNET): a network namespace of its own, with only a
                    loopback device that is down. Nothing can connect anywhere, 127.0.0.1
                    included. Needs CAP_SYS_ADMIN (root in a container that allows it).
``user-namespace``  unshare(CLONE_NEWUSER | CLONE_NEWNET): the same, for an unprivileged
                    user where the kernel allows user namespaces.
``audit-hook``      neither is permitted: a Python audit hook (which cannot be removed)
                    refuses to create or use IPv4/IPv6/packet sockets and to resolve names.
                    Code that leaves Python (ctypes, a child process) gets past it; for an
                    MCP server (``--exec``) there is no such fallback and ``none`` is in force.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import importlib
import importlib.util
import inspect
import os
import resource
import socket
import sys
import typing
from typing import Any

import msgspec

from mesh.llm.sandbox import CallRequest, CallResult, Limits
from mesh.llm.tools import render

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
MiB = 1024 * 1024
ISOLATION = "none"  # how this process was kept off the network (see the module's docstring)
_BLOCKED_FAMILIES = {socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_PACKET", -1)}
_BLOCKED_EVENTS = {
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.gethostbyaddr",
}


def leave_network(limits: Limits, *, hook: bool = True) -> str:
    """Take this process off the network as `limits` say; returns how (see `ISOLATION`)."""
    if limits.network:
        return "none"
    if limits.namespaces:
        libc = ctypes.CDLL(None, use_errno=True)
        for flags, how in ((CLONE_NEWNET, "namespace"), (CLONE_NEWUSER | CLONE_NEWNET, "user-namespace")):
            if libc.unshare(flags) == 0:
                return how
    if not hook:
        return "none"
    sys.addaudithook(_refuse_network)
    return "audit-hook"


def _refuse_network(event: str, args: tuple[Any, ...]) -> None:
    if event in _BLOCKED_EVENTS:
        raise PermissionError(f"network access is not allowed in this sandbox ({event})")
    if event == "socket.__new__" and args[1] in _BLOCKED_FAMILIES:
        raise PermissionError("network access is not allowed in this sandbox (socket)")
    if event in ("socket.connect", "socket.bind", "socket.sendto") and args[0].family in _BLOCKED_FAMILIES:
        raise PermissionError(f"network access is not allowed in this sandbox ({event})")


def apply_limits(limits: Limits) -> None:
    """Set the rlimits, soft and hard alike so the tool cannot raise them. CPU seconds
    count from the worker's start; the hard CPU limit is a second past the soft one, so a
    process that ignores SIGXCPU is killed."""
    if limits.cpu_seconds is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
    for which, value in (
        (resource.RLIMIT_AS, limits.memory_mb * MiB if limits.memory_mb is not None else None),
        (resource.RLIMIT_NOFILE, limits.open_files),
        (resource.RLIMIT_NPROC, limits.processes),
    ):
        if value is not None:
            resource.setrlimit(which, (value, value))


def _find(request: CallRequest) -> Any:
    """The tool's function, from its module imported here under the name it has in the
    agent: by file for an agent loaded from a path (or run as a script), else by name."""
    sys.path[:0] = [p for p in request.sys_path if p not in sys.path]
    if request.file and (request.module == "__main__" or request.module.startswith("mesh_user_")):
        name = "__mesh_tool_main__" if request.module == "__main__" else request.module
        spec = importlib.util.spec_from_file_location(name, request.file)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {request.file!r} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(request.module)
    return functools.reduce(getattr, request.qualname.split("."), module)


def call(request: CallRequest) -> CallResult:
    global ISOLATION
    ISOLATION = leave_network(request.limits)
    try:
        fn = inspect.unwrap(_find(request))
        [param] = inspect.signature(fn).parameters.values()
        value = msgspec.json.decode(request.args, type=typing.get_type_hints(fn)[param.name])
    except Exception as exc:
        error = f"could not be loaded in its sandbox: {type(exc).__name__}: {exc}"
        return CallResult(ok=False, error=error, isolation=ISOLATION)
    apply_limits(request.limits)
    try:
        output = render(asyncio.run(fn(value)))
    except BaseException as exc:  # the tool's own failure, SystemExit included
        said = f": {exc}" if str(exc) else ""
        return CallResult(ok=False, error=f"raised {type(exc).__name__}{said}", isolation=ISOLATION)
    return CallResult(ok=True, output=output, isolation=ISOLATION)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--exec"]:
        if len(argv) < 4 or argv[2] != "--":
            print("usage: sandbox_worker --exec LIMITS -- program [args...]", file=sys.stderr)
            return 2
        limits = msgspec.json.decode(argv[1], type=Limits)
        leave_network(limits, hook=False)
        apply_limits(limits)
        try:
            os.execv(argv[3], argv[3:])  # the environment is already the sandbox's own
        except OSError as exc:
            print(f"sandbox_worker: cannot run {argv[3]!r}: {exc}", file=sys.stderr)
            return 127
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the tool's prints go to stderr, never into the answer
    request = msgspec.json.decode(sys.stdin.buffer.read(), type=CallRequest)
    answer.write(msgspec.json.encode(call(request)))
    answer.flush()
    return 0


if __name__ == "__main__":
    # run as the importable module, so a tool reading `mesh.llm.sandbox_worker.ISOLATION`
    # sees this process's value, not a second copy's
    from mesh.llm import sandbox_worker

    sys.exit(sandbox_worker.main(sys.argv[1:]))
