"""Running an agent as a service: connect, start, wait for a signal, drain, and exit
non-zero if the connection silently stopped reading."""

from __future__ import annotations

import asyncio
import gc
import signal

from mesh.agent.declaration import Agent
from mesh.agent.identity import provision
from mesh.agent.runner import AgentRuntime
from mesh.llm import LLM
from mesh.runtime import backlog as backlogs
from mesh.runtime.discovery import PREFIX
from mesh.transport import streams
from mesh.transport.base import Transport
from mesh.transport.nats import NatsTransport
from mesh.wire.errors import ServerError
from mesh.wire.settings import Settings


async def serve(
    agent: Agent,
    settings: Settings,
    *,
    url: str | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
    llm: LLM | None = None,
    instance: str | None = None,
) -> AgentRuntime:
    """Connect, run `agent` until `stop` is set or SIGTERM/SIGINT arrives, then drain.

    A second signal during the drain ends it at once (running work is dead-lettered).
    Raises `ServerError` if the connection stops reading, so a supervisor restarts us.
    """
    settings = await provision(agent, settings)  # its own identity, when the server needs one
    transport = await NatsTransport.connect(settings, f"{agent.name}", url=url)
    runtime = AgentRuntime(agent, settings, transport, llm=llm, instance=instance)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            runtime.hurry()
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    watchdog: asyncio.Task[None] | None = None
    backlog: asyncio.Task[None] | None = None  # the consumers' backlog, as metrics
    try:
        await runtime.start()
        # what start-up made (modules, the agent, its schemas and clients) lives as long as
        # the process: out of the collector's way, so its passes only walk per-message garbage
        gc.freeze()
        if ready is not None:
            ready.set()
        probe = f"{PREFIX}.PING.{agent.name}.{runtime.instance}"  # answered by this process
        watchdog = asyncio.create_task(_watch_connection(transport, stop, probe))
        backlog = backlogs.watch(transport, agent.name, streams.agent_consumer_specs(agent, settings))
        await stop.wait()
        await runtime.stop()
        if watchdog.done() and watchdog.exception() is not None:
            raise watchdog.exception()  # type: ignore[misc]
        if transport.closed.is_set():
            raise ServerError(
                "the NATS connection was closed by the server or the client gave up reconnecting "
                "(see the log line before this one); exiting so a supervisor restarts this replica"
            )
    finally:
        for task in (watchdog, backlog):
            if task is not None:
                task.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await transport.close()
    return runtime


async def _watch_connection(
    transport: Transport, stop: asyncio.Event, probe: str, every: float = 5.0
) -> None:
    """Stop at once if the connection closes for good. And every few seconds, ask this
    process's own discovery responder (`probe`) through the server: if a connected client
    gets no answer twice in a row, its read loop is gone (nats-py ends it on unexpected
    input while still reporting itself connected) and it would silently receive nothing
    more: stop, and fail so the process exits non-zero."""
    misses = 0
    closed = asyncio.ensure_future(transport.closed.wait())
    try:
        while not stop.is_set():
            # nats-py never reconnects after the server closed the connection with an error
            await asyncio.wait([closed], timeout=every)
            if closed.done():
                stop.set()
                return
            try:
                await transport.request(probe, b"", timeout=every)
                misses = 0
            except Exception:
                misses += 1 if transport.is_connected else 0
                if misses >= 2:
                    stop.set()
                    raise ServerError(
                        "the NATS connection stopped reading (its own probe went unanswered twice "
                        "while connected); stopping so this replica can be restarted"
                    ) from None
    finally:
        closed.cancel()
