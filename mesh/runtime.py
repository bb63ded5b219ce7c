"""Running an agent: subscriptions, dispatch by type, bounded concurrency, dead letters,
discovery and a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Awaitable
from typing import Any

import structlog

from mesh import subjects
from mesh.agent import Agent, Handler
from mesh.client import MeshClient
from mesh.codec import Codec, default_codec
from mesh.context import Context
from mesh.deadletter import dead_letter, ensure_stream
from mesh.discovery import PREFIX, Endpoint, ServiceResponder, Stats
from mesh.envelope import new_id, open_envelope
from mesh.errors import ConfigError, DeliveryError, ServerError, UnknownTypeError
from mesh.llm import LLM, make_llm
from mesh.logs import log_context
from mesh.messages import Message
from mesh.middleware import Call, chain
from mesh.settings import Settings
from mesh.tracing import tracing
from mesh.transport import NatsTransport, Subscription, Transport


class AgentRuntime:
    """One process's instance of an agent, attached to a transport."""

    def __init__(
        self,
        agent: Agent,
        settings: Settings,
        transport: Transport,
        *,
        llm: LLM | None = None,
        codec: Codec = default_codec,
        instance: str | None = None,
    ) -> None:
        if not agent.handlers:
            raise ConfigError(
                f"agent {agent.name!r} has no handlers: add one with @{agent.name}.handler "
                f"(or whatever the Agent variable is called) before running it"
            )
        self.agent = agent
        self.settings = settings
        self.transport = transport
        self.codec = codec
        self.instance = instance or new_id()
        self.llm = llm or make_llm(settings)
        self.client = MeshClient(transport, sender=agent.name, codec=codec)
        self.stats = Stats()
        self.log = structlog.get_logger("mesh.agent").bind(agent=agent.name, instance=self.instance)
        self._limit = asyncio.Semaphore(agent.concurrency or settings.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._dlq_stored = False
        middleware = [tracing, log_context, *agent.middleware]
        self._calls = {id(h): chain(_invoker(h), middleware) for h in agent.handlers}
        self._responder: ServiceResponder | None = None
        self._expired = False
        self._hurry = asyncio.Event()

    def endpoints(self) -> list[Endpoint]:
        name = self.agent.name
        eps = [Endpoint("inbox", subjects.inbox_pattern(name), name)]
        seen = set()
        for h in self.agent.handlers:
            if h.events and h.mtype.name not in seen:
                seen.add(h.mtype.name)
                eps.append(
                    Endpoint(h.mtype.name.replace(".", "_"), subjects.event_pattern(h.mtype.name), name)
                )
        return eps

    async def start(self) -> None:
        self._dlq_stored = await ensure_stream(self.transport, self.settings.dead_letter_stream)
        if not self._dlq_stored:
            self.log.warning("the NATS server has no JetStream: dead letters are published but not stored")
        endpoints = self.endpoints()
        for ep in endpoints:
            self._subs.append(
                await self.transport.subscribe(ep.subject, self._on_message, queue=ep.queue_group)
            )
        self._responder = ServiceResponder(
            self.transport,
            name=self.agent.name,
            version=self.agent.version,
            description=self.agent.description,
            metadata={"mesh.handles": ",".join(str(h.mtype) for h in self.agent.handlers)},
            endpoints=endpoints,
            stats=lambda: self.stats,
            instance=self.instance,
        )
        await self._responder.start()
        await self.transport.flush()
        self.log.info(
            "agent started",
            handles=[str(h.mtype) for h in self.agent.handlers],
            url=self.transport.connected_url,
        )

    def hurry(self) -> None:
        """End a drain now: what is still running or queued is dead-lettered (second Ctrl-C)."""
        self._hurry.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking messages and finish what was received, all within one drain timeout.

        Whatever is still running or waiting for a worker slot when it runs out (or when
        `hurry` is called) is dead-lettered as ``drain_timeout``, not lost.
        """
        budget = timeout or self.settings.drain_timeout
        drains = [asyncio.create_task(_quietly(sub.drain())) for sub in self._subs]
        self._subs.clear()
        hurry: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        while not hurry.done():
            # queued deliveries become new tasks while the drains run: keep collecting them
            pending: list[asyncio.Future[Any]] = [w for w in (*drains, *self._tasks) if not w.done()]
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                break
            await asyncio.wait([*pending, hurry], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        self._expired = True  # from here on, queued deliveries are dead-lettered, not handled
        late = list(self._tasks)
        for task in late:
            task.cancel()
        if late:
            self.log.warning("drain timed out; cancelled handlers are dead-lettered", cancelled=len(late))
        # cancelled handlers free their slots, queued deliveries go to the DLQ, drains finish
        leftovers = [*drains, *late, *self._tasks]
        if leftovers:
            await asyncio.wait(leftovers, timeout=10)
        hurry.cancel()
        if self._responder is not None:
            await self._responder.stop()
        with contextlib.suppress(Exception):
            await self.transport.flush()
        self.log.info("agent stopped", handled=self.stats.handled, errors=self.stats.errors)

    async def _on_message(self, msg: Any) -> None:
        await self._limit.acquire()
        if self._expired:
            self._limit.release()
            self.stats.received += 1
            self.stats.dead_lettered += 1
            await self._dead_letter(msg, "drain_timeout", "the agent stopped before handling it")
            return
        task = asyncio.create_task(self._process(msg))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._limit.release()

    async def _process(self, msg: Any) -> None:
        stats = self.stats
        stats.received += 1
        stats.in_flight += 1
        started = time.perf_counter_ns()
        try:
            try:
                handler, message, ctx = self._accept(msg)
            except DeliveryError as exc:
                stats.dead_lettered += 1
                await self._dead_letter(msg, exc.kind, exc.reason)
                return
            except Exception as exc:  # a check itself failed: keep the message, say why
                stats.dead_lettered += 1
                await self._dead_letter(msg, "internal_error", f"{type(exc).__name__}: {exc}")
                return
            try:
                await self._calls[id(handler)](ctx, message)
                stats.handled += 1
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or not task.cancelling():
                    raise  # not cancelled by stop(); nothing to keep
                stats.dead_lettered += 1
                await self._dead_letter(
                    msg, "drain_timeout", f"{handler.name} was still running when the agent stopped"
                )
                raise
            except Exception as exc:
                stats.errors += 1
                stats.dead_lettered += 1
                stats.last_error = f"{type(exc).__name__}: {exc}"
                self.log.exception(
                    "handler failed",
                    handler=handler.name,
                    message_id=ctx.message_id,
                    conversation_id=ctx.conversation_id,
                )
                await self._dead_letter(msg, "handler_error", f"{handler.name} raised {stats.last_error}")
        finally:
            stats.in_flight -= 1
            stats.processing_ns += time.perf_counter_ns() - started

    def _accept(self, msg: Any) -> tuple[Handler, Message, Context]:
        """Check and decode a delivery; DeliveryError says why it cannot be handled."""
        limit = self.settings.max_message_bytes
        if len(msg.data) > limit:
            raise DeliveryError(
                "oversize", f"body is {len(msg.data)} bytes; the limit is {limit} (MESH_MAX_MESSAGE_BYTES)"
            )
        env = open_envelope(msg.subject, msg.data, msg.headers, msg.reply)
        if env.address.kind == subjects.EVENT and env.type_name != env.address.target:
            raise DeliveryError(
                "bad_header",
                f"Mesh-Type {env.type_name!r} does not match the event subject's type {env.address.target!r}",
            )
        if env.hop > self.settings.max_hops:
            raise DeliveryError(
                "hop_limit", f"hop {env.hop} is past the limit of {self.settings.max_hops} (a loop?)"
            )
        if env.deadline_ms is not None and env.deadline_ms < time.time() * 1000:
            raise DeliveryError("deadline_expired", f"deadline {env.deadline_ms} ms passed before handling")
        handler = self.agent.handler_for(env.type_name, env.version)
        if handler is None:
            handled = ", ".join(str(h.mtype) for h in self.agent.handlers)
            want = env.type_name if env.version is None else f"{env.type_name}@{env.version}"
            raise UnknownTypeError(
                "unknown_type", f"agent {self.agent.name!r} has no handler for {want} (it handles {handled})"
            )
        message = self.codec.decode(msg.data, handler.mtype.cls, env.content_type)
        ctx = Context(env, self.client, self.agent.name, self.instance, self.llm, self.log)
        return handler, message, ctx

    async def _dead_letter(self, msg: Any, kind: str, reason: str) -> None:
        await dead_letter(
            self.transport, agent=self.agent.name, msg=msg, kind=kind, reason=reason, stored=self._dlq_stored
        )


async def _quietly(aw: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):
        await aw


def _invoker(handler: Handler) -> Call:
    """The innermost call: run the handler and send what it returns as the reply."""
    fn, with_ctx = handler.fn, handler.takes_context

    async def invoke(ctx: Context, message: Message) -> Message | None:
        result: object = await (fn(message, ctx) if with_ctx else fn(message))
        if isinstance(result, Message):
            await ctx.reply(result)
        elif result is not None:
            raise TypeError(
                f"handler {handler.name} returned {type(result).__name__}; return a mesh.Message "
                f"(sent as the reply) or None"
            )
        return None

    return invoke


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
    try:
        await runtime.start()
        if ready is not None:
            ready.set()
        probe = f"{PREFIX}.PING.{agent.name}.{runtime.instance}"  # answered by this process
        watchdog = asyncio.create_task(_watch_connection(transport, stop, probe))
        await stop.wait()
        await runtime.stop()
        if watchdog.done() and watchdog.exception() is not None:
            raise watchdog.exception()  # type: ignore[misc]
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in installed:
            loop.remove_signal_handler(sig)
        await transport.close()
    return runtime


async def _watch_connection(
    transport: Transport, stop: asyncio.Event, probe: str, every: float = 5.0
) -> None:
    """Every few seconds, ask this process's own discovery responder (`probe`) through the
    server. If a connected client gets no answer twice in a row, its read loop is gone
    (nats-py ends it on some malformed input while still reporting itself connected) and it
    would silently receive nothing more: stop, and fail so the process exits non-zero."""
    misses = 0
    while not stop.is_set():
        await asyncio.sleep(every)
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
