"""Running an agent: durable and direct deliveries, dispatch by type, bounded concurrency,
acknowledgements and retries, dead letters, discovery and a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any

import structlog
from opentelemetry import context as otel_context

from mesh.agent.context import Context
from mesh.agent.declaration import Agent, Handler
from mesh.agent.invoke import handler_call, join_call
from mesh.join import Gathered, Join
from mesh.llm import LLM, budgeted, llm_scope, make_llm
from mesh.llm.journal import Journal, journaled
from mesh.middleware.base import chain
from mesh.middleware.loops import carry_trail, loop_guard
from mesh.middleware.signing import signing
from mesh.observability.logs import log_context
from mesh.observability.record import Recorder, recording
from mesh.observability.tracing import extract_context, inject_trace, tracing
from mesh.patterns.approval import ApprovalKeeper
from mesh.patterns.escalation import Escalations
from mesh.patterns.fanin import JoinKeeper, JoinState
from mesh.patterns.policy import Policy
from mesh.runtime import retries
from mesh.runtime.audit import AUTH_FAILURES, AuditLog, audit_refusal
from mesh.runtime.cancel import Cancellations
from mesh.runtime.client import Answer, MeshClient
from mesh.runtime.deadletter import answer_failure, dead_letter
from mesh.runtime.discovery import Endpoint, ServiceResponder, Stats
from mesh.runtime.keepers import Keepers, Outcome
from mesh.runtime.ladder import (
    Accept,
    Count,
    Escalate,
    GiveUp,
    Guard,
    Quota,
    Run,
    Seen,
    Settle,
    SettleDirect,
    Take,
    TimeLimit,
    Verify,
    Work,
    cancelled_by_stop,
)
from mesh.runtime.metered import measured, metered
from mesh.runtime.outcome import Recorded
from mesh.runtime.quota import Quotas
from mesh.runtime.retries import Failures
from mesh.runtime.verify import UNPROVEN, SeenIds, verifier_of
from mesh.transport import streams
from mesh.transport.base import Subscription, Transport
from mesh.transport.delivery import Consumer, Delivery, Later
from mesh.transport.keys import signer_of
from mesh.transport.outbox import Outbox
from mesh.transport.state import StateStore
from mesh.wire import subjects
from mesh.wire.codec import Codec, default_codec
from mesh.wire.envelope import Envelope, new_id, open_envelope
from mesh.wire.errors import ConfigError, DeliveryError, UnknownTypeError
from mesh.wire.messages import Message
from mesh.wire.settings import Settings


class AgentRuntime:
    """One process's instance of an agent, attached to a transport.

    Stored deliveries (inbox and events, from JetStream) are acknowledged after the handler
    and everything it sent are stored; a failure is retried with backoff and dead-lettered
    after MESH_MAX_DELIVER deliveries. Direct deliveries (core NATS requests) are handled at
    most once; a failure is dead-lettered at once.
    """

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
        if not agent.handlers and not agent.joins:
            raise ConfigError(
                f"agent {agent.name!r} has no handlers: add one with @{agent.name}.handler "
                f"(or whatever the Agent variable is called) before running it"
            )
        for join in agent.joins.values():
            if join.handler is None:
                raise ConfigError(
                    f"join {join.name!r} of agent {agent.name!r} has no completion handler: "
                    f"decorate one with @{join.name}.complete"
                )
        self.agent = agent
        self.settings = settings
        self.transport = transport
        self.codec = codec
        self.instance = instance or new_id()
        self.policy = policy = Policy.load(settings, agent.name)  # MESH_POLICY_FILE: a bad rule stops here
        # budgets before the model, the journal around them (a replay is free), the rules outside
        self.llm: LLM = policy.govern(journaled(budgeted(llm or make_llm(settings), settings, transport)))
        self.journal = Journal(agent.name)  # its bucket is bound at start
        self._signer = signer_of(settings)
        self.recorder = Recorder(
            transport, agent.name, secret_headers=settings.secret_header_names, enabled=settings.record
        )
        self.client = MeshClient(
            transport,
            sender=agent.name,
            codec=codec,
            # the policy's rules, then the signature over what they let out, then the record of it
            publish_middleware=(
                inject_trace,
                carry_trail,  # the loop guard's trail (mesh.middleware.loops)
                *agent.publish_middleware,
                policy.outgoing,
                *((signing(self._signer),) if self._signer is not None else ()),
                *((recording(self.recorder),) if settings.record else ()),
            ),
            signer=self._signer,
        )
        self.verifier = verifier_of(settings)  # on whenever the agent has an identity
        if self.verifier is not None:  # and the answers to its own requests are checked too
            self.client.directory = self.verifier.directory
        self.audit = AuditLog(transport, agent.name, self.instance)
        self.cancels = Cancellations(transport, agent.name, self.instance)  # `mesh cancel`, deadlines
        self.stats = Stats()
        self.log = structlog.get_logger("mesh.agent").bind(agent=agent.name, instance=self.instance)
        self._capacity = agent.concurrency or settings.concurrency
        self._limit = asyncio.Semaphore(self._capacity)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._consumers: list[Consumer] = []
        self._working: dict[asyncio.Task[Any], Delivery] = {}  # stored deliveries being handled
        scopes = (self.journal.scope, policy.scope)  # each handling's journal and rules
        middleware = [tracing, log_context, loop_guard, llm_scope, *scopes, *agent.middleware]
        self._calls = {id(h): chain(handler_call(h), middleware) for h in agent.handlers}
        self._join_calls = {name: chain(join_call(j), middleware) for name, j in agent.joins.items()}
        self._responder: ServiceResponder | None = None
        self._joins: JoinKeeper | None = None
        self._approvals: ApprovalKeeper | None = None
        self._keepers = Keepers()  # joins and approvals, by the message types they take
        self._failures: Failures | None = None
        self._stored: Take | None = None  # the ladders (mesh.runtime.ladder), built at start
        self._direct: Take | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._expired = False
        self._hurry = asyncio.Event()
        self._mcp_attached = False

    def _ladders(
        self, processed: StateStore, failures: Failures, seen: StateStore | None, escalate: Escalate
    ) -> tuple[Take, Take]:
        """What happens to each stored and each direct delivery, top rung first."""
        settings, stats = self.settings, self.stats
        run = self.cancels.rung(Run(self._run))  # a cancellation or a deadline ends it
        stored: Take = TimeLimit(run, settings.handler_timeout)
        stored = GiveUp(stored, failures, settings.max_deliver)
        stored = Accept(stored, self._accept)
        stored = Guard(stored, processed, self.agent.name)
        direct: Take = Accept(run, self._accept)
        if seen is not None:
            direct = Seen(direct, SeenIds(seen, self.agent.name))
        if settings.sender_rate:  # one table for both: a sender's quota is per process
            quotas = Quotas(settings.sender_rate, settings.sender_burst)
            stored, direct = Quota(stored, quotas), Quota(direct, quotas)
        if settings.record:
            recorder, most = self.recorder, settings.max_deliver
            stored, direct = Recorded(stored, recorder, most), Recorded(direct, recorder, most)
        if self.verifier is not None:  # first: the quota then counts the proven sender
            stored, direct = Verify(stored, self.verifier), Verify(direct, self.verifier)
        stored, direct, meters = metered(stored, direct, self.agent.name, settings.max_deliver)
        stored = Settle(
            stored,
            agent=self.agent.name,
            settings=settings,
            stats=stats,
            processed=processed,
            failures=failures,
            dead_letter=self._dead_letter,
            log=self.log,
            escalate=escalate,
        )
        direct = SettleDirect(direct, stats, self._fail_direct, self.log)
        return measured(Count(stored, stats), meters), measured(Count(direct, stats), meters)

    def endpoints(self) -> list[Endpoint]:
        name = self.agent.name
        eps = [
            Endpoint("inbox", subjects.inbox_pattern(name), name),
            Endpoint("direct", subjects.direct_pattern(name), name),
        ]
        for t in self._event_types():
            eps.append(Endpoint(t.replace(".", "_"), subjects.event_pattern(t), name))
        return eps

    def _event_types(self) -> list[str]:
        return streams.event_types(self.agent)

    async def start(self) -> None:
        settings, name = self.settings, self.agent.name
        if self.agent.mcp_servers:  # before anything reads the toolbox
            await self.agent.mcp_servers.attach(self.agent.tools)
            self._mcp_attached = True
        await self.transport.ensure_streams()
        processed_spec, state_spec, seen_spec, journal_spec = streams.bucket_specs(settings)
        processed = await self.transport.state(processed_spec, settings)
        state = await self.transport.state(state_spec, settings)
        await self.journal.open(self.transport, journal_spec, settings)
        # the ids of direct messages: only where senders are proven (a mesh with identities)
        shared = self.verifier is not None and settings.replay_shared
        seen = await self.transport.state(seen_spec, settings) if shared else None
        self._failures = Failures(state, name, self.instance)
        escalations = Escalations(name, state, self.client, settings.secret_header_names)
        self._stored, self._direct = self._ladders(processed, self._failures, seen, escalations.escalate)
        self._joins = JoinKeeper(
            name,
            self.agent.joins,
            state,
            settings.max_depth,
            settings.max_deliver,
            authenticated=self.verifier is not None,
        )
        self._joins.run_completion = self._complete
        self._approvals = ApprovalKeeper(self.agent, state, settings.approval_timeout, settings.max_deliver)
        self._keepers = Keepers()
        self._keepers.add(self._joins)
        self._keepers.add(self._approvals)
        self._subs.append(await self.cancels.start())  # `mesh cancel`s, before any message is taken
        for spec in streams.agent_consumer_specs(self.agent, settings):
            await self.transport.ensure_consumer(spec)
            self._subs.append(
                await self.transport.subscribe(
                    f"{retries.ADVISORY}.{spec.stream}.{spec.name}", self._on_advisory, queue=name
                )
            )
            self._consumers.append(await self.transport.consume(spec, self._on_stored, self._capacity))
        self._subs.append(
            await self.transport.listen(subjects.direct_pattern(name), self._on_direct, queue=name)
        )
        self._responder = ServiceResponder(
            self.transport,
            name=name,
            version=self.agent.version,
            description=self.agent.description,
            metadata={
                "mesh.handles": ",".join(str(h.mtype) for h in self.agent.handlers),
                **({"mesh.tools": self.agent.tools.catalog()} if len(self.agent.tools) else {}),
            },
            endpoints=self.endpoints(),
            stats=lambda: self.stats,
            instance=self.instance,
            signer=self._signer,
        )
        await self._responder.start()
        self._ticker = asyncio.create_task(self._keep_alive())
        await self.transport.flush()
        self.log.info(
            "agent started",
            handles=[str(h.mtype) for h in self.agent.handlers],
            joins=list(self.agent.joins),
            url=self.transport.connected_url,
        )

    def hurry(self) -> None:
        """End a drain now (second Ctrl-C): stored work goes back to the stream, direct work
        is dead-lettered."""
        self._hurry.set()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking messages and finish what was received, all within one drain timeout.

        What is still running when it runs out (or when `hurry` is called) is cancelled:
        a stored message is handed back to the stream at once, for another replica or the
        next start; a direct one is dead-lettered as ``drain_timeout``.
        """
        budget = timeout or self.settings.drain_timeout
        for consumer in self._consumers:
            await consumer.stop()
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
        self._expired = True  # from here on, queued direct deliveries are dead-lettered
        late = list(self._tasks)
        for task in late:
            task.cancel()
        if late:
            self.log.warning("drain timed out; cancelled running handlers", cancelled=len(late))
        leftovers = [*drains, *late, *self._tasks]
        if leftovers:
            await asyncio.wait(leftovers, timeout=10)
        hurry.cancel()
        if self._ticker is not None:
            self._ticker.cancel()
        for consumer in self._consumers:
            await consumer.close()
        self._consumers.clear()
        if self._responder is not None:
            await self._responder.stop()
        with contextlib.suppress(Exception):
            await self.transport.flush()
        if self._mcp_attached:
            self._mcp_attached = False
            await self.agent.mcp_servers.detach(self.agent.tools)
        self.log.info("agent stopped", handled=self.stats.handled, errors=self.stats.errors)

    # ------------------------------------------------------------ direct (core NATS)

    async def _on_direct(self, d: Delivery) -> None:
        await self._limit.acquire()
        if self._expired:
            self._limit.release()
            self.stats.received += 1
            await self._fail_direct(d, "drain_timeout", "the agent stopped before handling it")
            return
        task = asyncio.create_task(self._process_direct(d))
        self._tasks.add(task)
        task.add_done_callback(self._direct_done)

    def _direct_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._limit.release()

    async def _process_direct(self, d: Delivery) -> None:
        assert self._direct is not None
        await self._direct(Work(d))

    # ------------------------------------------------------------ stored (JetStream)

    async def _on_stored(self, d: Delivery, consumer: Consumer) -> None:
        task = asyncio.create_task(self._process_stored(d, consumer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process_stored(self, d: Delivery, consumer: Consumer) -> None:
        assert self._stored is not None
        me = asyncio.current_task()
        assert me is not None
        self._working[me] = d  # kept alive from arrival, also while it waits for a slot
        try:
            async with self._limit:
                if self._expired:
                    await d.nak()
                    return
                await self._stored(Work(d))
        except asyncio.CancelledError:
            if cancelled_by_stop():
                with contextlib.suppress(Exception):
                    await d.nak()  # back to the stream now, not after MESH_ACK_WAIT
            raise
        finally:
            self._working.pop(me, None)
            consumer.done()

    async def _on_advisory(self, msg: Any) -> None:
        assert self._failures is not None
        self.stats.dead_lettered += 1
        await retries.on_max_deliveries(
            self.transport,
            self._failures,
            self.agent.name,
            msg.data,
            secret_headers=self.settings.secret_header_names,
        )

    async def _keep_alive(self) -> None:
        await retries.keep_alive(self._working, self.settings.ack_wait)

    # ------------------------------------------------------------ both

    def _accept(self, d: Delivery) -> tuple[Envelope, Context, Message | None, Handler | None]:
        """Check and decode a delivery; DeliveryError says why it cannot be handled.

        A join's answer or timer is decoded by the join, so it has no handler here."""
        limit = self.settings.max_message_bytes
        if len(d.data) > limit:
            raise DeliveryError(
                "oversize", f"body is {len(d.data)} bytes; the limit is {limit} (MESH_MAX_MESSAGE_BYTES)"
            )
        env = open_envelope(d.subject, d.data, d.headers, d.reply, d.origin)
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
        ctx = self._context(env, d.attempt)
        if self._keepers.find(env) is not None:
            return env, ctx, None, None
        handler = self.agent.handler_for(env.type_name, env.version)
        if handler is None:
            handled = ", ".join(str(h.mtype) for h in self.agent.handlers)
            want = env.type_name if env.version is None else f"{env.type_name}@{env.version}"
            raise UnknownTypeError(
                "unknown_type", f"agent {self.agent.name!r} has no handler for {want} (it handles {handled})"
            )
        message = self.codec.decode(d.data, handler.mtype.cls, env.content_type)
        return env, ctx, message, handler

    def _context(
        self, env: Envelope, attempt: int, answer: Answer | None = None, outbox: Outbox | None = None
    ) -> Context:
        """The context of one run; its stored sends go through one outbox (a join's completion
        shares the outbox of the answer that completes it)."""
        return Context(
            env,
            self.client,
            self.agent.name,
            self.instance,
            self.llm,
            self.log,
            joins=self._joins,
            answer=answer,
            attempt=attempt,
            settings=self.settings,
            tools=self.agent.tools,
            permissions=self.agent.permissions,
            approvals=self._approvals,
            outbox=outbox if outbox is not None else self.transport.outbox(),
            audit=self.audit,
        )

    async def _run(
        self, env: Envelope, ctx: Context, message: Message | None, handler: Handler | None
    ) -> Outcome | Later | None:
        if handler is None:  # a join's answer or timer, an approval's decision or timer
            # no span of its own, but what it sends (a completion, a resumed message) stays
            # in the trace of what it received
            token = otel_context.attach(extract_context(env.headers))
            try:
                keeper = self._keepers.find(env)
                assert keeper is not None
                return await keeper.receive(env, ctx)
            finally:
                otel_context.detach(token)
        assert message is not None
        await self._calls[id(handler)](ctx, message)
        return None

    async def _complete(self, join: Join[Any], gathered: Gathered[Any], ctx: Context, st: JoinState) -> None:
        """Run a join's completion handler; its answer goes where the fan-out's message wanted."""
        done = self._context(ctx.envelope, ctx.attempt, st.answer(), ctx.outbox)
        parts = [st.parts[b] for b in st.order]
        done.completing(join.name, tuple(p.message_id for p in parts), tuple(p.traceparent for p in parts))
        await self._join_calls[join.name](done, gathered)  # type: ignore[arg-type]

    async def _dead_letter(
        self, msg: Any, kind: str, reason: str, extra: dict[str, str] | None = None
    ) -> bool:
        if kind in AUTH_FAILURES:
            await audit_refusal(self.audit, msg, kind, reason)
        return await dead_letter(
            self.transport,
            agent=self.agent.name,
            msg=msg,
            kind=kind,
            reason=reason,
            extra=extra,
            secret_headers=self.settings.secret_header_names,
        )

    async def _fail_direct(self, msg: Delivery, kind: str, reason: str) -> None:
        """Dead-letter a direct delivery and, if someone waits for an answer, tell them why:
        unless who sent it, or where it asks to be answered, is not proven (the reply subject
        may be someone else's)."""
        self.stats.dead_lettered += 1
        await self._dead_letter(msg, kind, reason)
        if kind not in UNPROVEN:
            await answer_failure(self.transport, msg, self.agent.name, kind, reason, self._signer)


async def _quietly(aw: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):
        await aw
