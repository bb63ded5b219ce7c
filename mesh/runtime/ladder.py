"""What an agent does with each delivery, as a ladder of small rungs.

A rung takes a `Work` (the delivery, and what the rungs below learn about it) and the rung
below it. The runtime builds two ladders, top rung first:

    stored:  Count > Settle > Verify > Recorded > Quota > Guard > Accept > GiveUp > TimeLimit > Run
    direct:  Count > SettleDirect > Verify > Recorded > Quota > Seen > Accept > Run

(`Quota` only when MESH_SENDER_RATE is not 0; `Verify` and `Seen` only when identities are
on: the quota then counts the proven sender, so no one can spend another's. `Recorded`
(mesh.runtime.outcome) only when MESH_RECORD is on: below `Verify`, so the record holds only
proven messages. The metrics add `Measure` on top and `Outcome` below `Settle`,
mesh.runtime.metered; both read a delivery's outcome with `outcome.settled_as`.)

`Run` calls the handler (or a join or an approval). The rungs between turn what happened
into one of a few signals, and `Settle` turns each signal into what the stream is told:
acknowledge, hand back with a delay, or dead-letter (and acknowledge once the dead letter
is stored). Each rung can be built and tested alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh.runtime import retries
from mesh.runtime.verify import Copy
from mesh.transport import streams
from mesh.transport.delivery import Delivery, Later
from mesh.wire import envelope as h
from mesh.wire.errors import DeliveryError

if TYPE_CHECKING:
    from mesh.agent.context import Context
    from mesh.agent.declaration import Handler
    from mesh.runtime.discovery import Stats
    from mesh.runtime.quota import Quotas
    from mesh.runtime.retries import Failures
    from mesh.runtime.verify import SeenIds, Verifier
    from mesh.transport.state import StateStore
    from mesh.wire.envelope import Envelope
    from mesh.wire.messages import Message
    from mesh.wire.settings import Settings


@dataclass(slots=True)
class Work:
    """One delivery on its way down the ladder."""

    delivery: Delivery
    env: Envelope | None = None
    ctx: Context | None = None
    message: Message | None = None
    handler: Handler | None = None
    processed_key: str = ""  # where the duplicate guard looked, and Settle marks it done
    outcome: str = ""  # what became of it, for its metrics (mesh.runtime.metered)
    reason: str = ""  # the kind of its dead letter, if it became one

    @property
    def handler_name(self) -> str:
        return self.handler.name if self.handler is not None else "the join"


Take = Callable[[Work], Awaitable["Later | None"]]
DeadLetter = Callable[[Delivery, str, str, "dict[str, str] | None"], Awaitable[bool]]
Escalate = Callable[[Work, str], Awaitable[bool]]  # hand failed work on (mesh.patterns.escalation)


# ---------------------------------------------------------------- signals


class Duplicate(Exception):
    """The message was processed before: acknowledge it, do nothing else."""


class HandlerFailed(Exception):
    """The handler raised, or ran out of time: retry it, or dead-letter it on the last
    allowed delivery. `error` says what happened, in words."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class Exhausted(DeliveryError):
    """No delivery is left: dead-letter with the failure history (`extra` headers), then
    forget the history."""

    def __init__(self, kind: str, reason: str, extra: dict[str, str]) -> None:
        super().__init__(kind, reason)
        self.extra = extra


# ---------------------------------------------------------------- rungs


class Count:
    """The counters that `mesh agents` shows."""

    def __init__(self, below: Take, stats: Stats) -> None:
        self.below = below
        self.stats = stats

    async def __call__(self, w: Work) -> Later | None:
        stats = self.stats
        stats.received += 1
        stats.in_flight += 1
        if w.delivery.attempt > 1:
            stats.redelivered += 1
        started = time.perf_counter_ns()
        try:
            return await self.below(w)
        finally:
            stats.in_flight -= 1
            stats.processing_ns += time.perf_counter_ns() - started


class Settle:
    """Tell the stream what became of a stored delivery. Nothing is dropped: a message is
    acknowledged only once handled, found processed before, or stored as a dead letter."""

    def __init__(
        self,
        below: Take,
        *,
        agent: str,
        settings: Settings,
        stats: Stats,
        processed: StateStore,
        failures: Failures,
        dead_letter: DeadLetter,
        log: Any,
        escalate: Escalate | None = None,
    ) -> None:
        self.below = below
        self.escalate = escalate  # where failed work goes instead of the dead letters, if declared
        self.agent = agent
        self.settings = settings
        self.stats = stats
        self.processed = processed
        self.failures = failures
        self.dead_letter = dead_letter
        self.log = log

    async def __call__(self, w: Work) -> Later | None:
        d = w.delivery
        try:
            outcome = await self.below(w)
        except Duplicate:
            self.stats.duplicates += 1
            await d.ack()
            return None
        except Exhausted as exc:
            handed_on = await self._escalated(w, exc.reason)
            if (handed_on or await self.reject(d, exc.kind, exc.reason, exc.extra)) and w.env is not None:
                await self.failures.forget(w.env.id)
            return None
        except DeliveryError as exc:  # bad input, Reject, depth limit, an unknown join...
            await self.reject(d, exc.kind, exc.reason)
            return None
        except HandlerFailed as exc:
            await self.retry(w, exc.error)
            return None
        if isinstance(outcome, Later):  # not due yet (a join's or an approval's timer)
            await d.nak(delay=outcome.delay)
            return outcome
        assert w.env is not None
        self.stats.handled += 1
        key = w.processed_key or streams.processed_key(self.agent, w.env.id)
        await self.processed.put_nowait(key, b"1")
        await d.ack()
        if d.attempt > 1:
            try:
                await self.failures.forget(w.env.id)
            except Exception as exc:  # only a stale history, kept until MESH_STATE expires it
                self.log.debug("failure history not forgotten", error=str(exc))
        return None

    async def retry(self, w: Work, error: str) -> None:
        assert w.env is not None
        d, stats, settings = w.delivery, self.stats, self.settings
        stats.errors += 1
        stats.last_error = error
        self.log.warning("handler failed", error=error, message_id=w.env.id, delivery=d.attempt)
        history = await self.failures.record(w.env.id, d.attempt, error)
        if d.attempt >= settings.max_deliver:
            extra = retries.history_headers(history, d.attempt)
            reason = f"{error} (delivery {d.attempt})"
            if await self._escalated(w, reason) or await self.reject(d, "handler_error", reason, extra):
                await self.failures.forget(w.env.id)
            return
        stats.retried += 1
        await d.nak(delay=retries.backoff(settings, d.attempt))

    async def _escalated(self, w: Work, reason: str) -> bool:
        """Hand the failed work on where its handler says (then acknowledge it); False if it
        does not escalate, or the escalation could not be stored (it is dead-lettered)."""
        if self.escalate is None:
            return False
        try:
            if not await self.escalate(w, reason):
                return False
        except Exception as exc:
            self.log.warning("escalation failed: dead-lettering instead", error=repr(exc))
            return False
        self.stats.escalated += 1
        w.outcome = "escalated"
        await w.delivery.ack()
        return True

    async def reject(self, d: Delivery, kind: str, reason: str, extra: dict[str, str] | None = None) -> bool:
        """Dead-letter and acknowledge; if the dead letter cannot be stored, hand the
        message back instead (it is never dropped)."""
        self.stats.dead_lettered += 1
        if await self.dead_letter(d, kind, reason, extra):
            await d.ack()
            return True
        await d.nak(delay=retries.backoff(self.settings, 3))
        return False


class SettleDirect:
    """A direct delivery is handled at most once: whatever fails is dead-lettered at once,
    and a requester waiting for the answer is told why (`fail`)."""

    def __init__(
        self, below: Take, stats: Stats, fail: Callable[[Delivery, str, str], Awaitable[None]], log: Any
    ) -> None:
        self.below = below
        self.stats = stats
        self.fail = fail
        self.log = log

    async def __call__(self, w: Work) -> Later | None:
        d = w.delivery
        try:
            await self.below(w)
            self.stats.handled += 1
        except asyncio.CancelledError:
            if cancelled_by_stop():
                await self.fail(d, "drain_timeout", "it was still running when the agent stopped")
            raise
        except DeliveryError as exc:
            await self.fail(d, exc.kind, exc.reason)
        except Exception as exc:
            stats = self.stats
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            env = w.env
            self.log.exception(
                "handler failed",
                message_id=env.id if env else "",
                conversation_id=env.conversation if env else "",
            )
            await self.fail(d, "handler_error", f"{w.handler_name} raised {stats.last_error}")
        return None


class Guard:
    """The duplicate guard: a message recorded as processed is not handled again. Asked on
    every stored delivery, first: after a broker crash a redelivery can come with a
    delivery count of 1, and a processed message must not be dead-lettered for a check
    (its deadline, say) that it passed the first time."""

    def __init__(self, below: Take, processed: StateStore, agent: str) -> None:
        self.below = below
        self.processed = processed
        self.agent = agent

    async def __call__(self, w: Work) -> Later | None:
        d = w.delivery
        msg_id = h.message_id(d.headers or {}, d.origin)  # DeliveryError if over the limit
        w.processed_key = streams.processed_key(self.agent, msg_id)  # the envelope's id is the same
        if await self.processed.exists(w.processed_key):
            raise Duplicate
        return await self.below(w)


class Quota:
    """A sender past its quota (MESH_SENDER_RATE, MESH_SENDER_BURST) is dead-lettered as
    ``rate_limited``, before its message is decoded or looked up. Every delivery counts,
    redeliveries too: one handed back because its dead letter could not be stored must not
    get through on its next delivery. Dead-lettered rather than handed back: a hand-back
    would come again and again, each time taking a slot from the other senders, and a direct
    message cannot be handed back at all; the letter keeps it, to be re-driven."""

    def __init__(self, below: Take, quotas: Quotas, sender: Callable[[Delivery], str] | None = None) -> None:
        self.below = below
        self.quotas = quotas
        self.sender = sender or claimed_sender  # proven by `Verify` above it, where identities are on

    async def __call__(self, w: Work) -> Later | None:
        sender = self.sender(w.delivery)
        if not self.quotas.take(sender):
            q = self.quotas
            raise DeliveryError(
                "rate_limited",
                f"sender {sender or '(none)'!r} is over its quota at this agent: {q.rate:g} messages a "
                f"second, {q.burst:g} at once (MESH_SENDER_RATE, MESH_SENDER_BURST)",
            )
        return await self.below(w)


def claimed_sender(d: Delivery) -> str:
    """Who a delivery says it is from (Mesh-Sender), as a quota's key: below `Verify`, the
    sender its signature proved."""
    return (d.headers or {}).get(h.SENDER, "")[: h.MAX_NAME]


class Verify:
    """Signed envelopes (mesh.runtime.verify): a message whose signature, signer or freshness
    cannot be proven is dead-lettered as ``unauthenticated`` before anything trusts its
    headers. Before the duplicate guard, so a replayed copy of a processed message is
    refused, not silently dropped; a redelivery of the same stored message passes."""

    def __init__(self, below: Take, verifier: Verifier) -> None:
        self.below = below
        self.verifier = verifier

    async def __call__(self, w: Work) -> Later | None:
        try:
            self.verifier.check(w.delivery)
        except Copy:
            raise Duplicate from None
        return await self.below(w)


class Seen:
    """On the direct ladder of a mesh with identities: the message's id is recorded where
    every replica of the agent looks (MESH_SEEN), and one a replica took already is refused
    as a replay. After the quota, so a sender over it costs no write."""

    def __init__(self, below: Take, seen: SeenIds) -> None:
        self.below = below
        self.seen = seen

    async def __call__(self, w: Work) -> Later | None:
        await self.seen.first(w.delivery)
        return await self.below(w)


Check = Callable[[Delivery], "tuple[Envelope, Context, Message | None, Handler | None]"]


class Accept:
    """Check and decode the delivery (DeliveryError says why it cannot be handled)."""

    def __init__(self, below: Take, check: Check) -> None:
        self.below = below
        self.check = check

    async def __call__(self, w: Work) -> Later | None:
        try:
            w.env, w.ctx, w.message, w.handler = self.check(w.delivery)
        except DeliveryError:
            raise
        except Exception as exc:  # a check itself failed: keep the message, say why
            raise DeliveryError("internal_error", f"{type(exc).__name__}: {exc}") from exc
        return await self.below(w)


TIMERS = frozenset({"mesh.join_timer", "mesh.approval_timer"})  # they wait by redelivery


class GiveUp:
    """Delivery number MESH_MAX_DELIVER + 1 means every earlier one ended without an
    acknowledgement or a dead letter (their processes died): dead-letter it unhandled."""

    def __init__(self, below: Take, failures: Failures, max_deliver: int) -> None:
        self.below = below
        self.failures = failures
        self.max_deliver = max_deliver

    async def __call__(self, w: Work) -> Later | None:
        d, env = w.delivery, w.env
        assert env is not None
        if d.attempt > self.max_deliver and env.type_name not in TIMERS:
            history = await self.failures.history(env.id)
            raise Exhausted(
                "max_deliveries",
                f"delivered {d.attempt - 1} times without an acknowledgement: the handler crashed, "
                f"hung past MESH_ACK_WAIT or its process was killed each time",
                retries.history_headers(history, d.attempt - 1),
            )
        return await self.below(w)


class TimeLimit:
    """MESH_HANDLER_TIMEOUT; any other failure of the handler becomes HandlerFailed."""

    def __init__(self, below: Take, timeout: float) -> None:
        self.below = below
        self.timeout = timeout

    async def __call__(self, w: Work) -> Later | None:
        limit = asyncio.timeout(self.timeout)
        try:
            async with limit:
                return await self.below(w)
        except DeliveryError:
            raise
        except Exception as exc:
            raise HandlerFailed(failure(w.handler_name, exc, limit.expired(), self.timeout)) from exc


RunFn = Callable[["Envelope", "Context", "Message | None", "Handler | None"], Awaitable[Any]]


class Run:
    """The bottom rung: the handler, a join or an approval; then the wait for everything
    it stored (its sends are published without waiting for each acknowledgement), so the
    rungs above settle the delivery only once what it sent is safe. If that wait fails, the
    run fails: the delivery is retried and the re-run's sends, with the same derived ids,
    are dropped where the first run's were stored."""

    def __init__(self, run: RunFn) -> None:
        self.run = run

    async def __call__(self, w: Work) -> Later | None:
        ctx = w.ctx
        assert w.env is not None and ctx is not None
        try:
            try:
                outcome = await self.run(w.env, ctx, w.message, w.handler)
            except DeliveryError:
                await ctx.flush()  # what it sent before it gave up, before the dead letter's ack
                raise
            await ctx.flush()
        finally:
            if ctx.outbox is not None:
                ctx.outbox.close()  # a failed run's sends are not waited for
        return outcome if isinstance(outcome, Later) else None


def failure(name: str, exc: Exception, expired: bool, timeout: float) -> str:
    """What went wrong, in words. A TimeoutError is the handler's own deadline only if that
    deadline expired: a NATS request or another timeout inside the handler raises one too."""
    if expired:
        return f"{name} ran past MESH_HANDLER_TIMEOUT={timeout:g}s"
    if isinstance(exc, TimeoutError):
        what = type(exc).__module__ + "." + type(exc).__name__
        return f"{name} raised {what} (a call inside it timed out): {exc}"
    return f"{name} raised {type(exc).__name__}: {exc}"


def cancelled_by_stop() -> bool:
    """Whether the current task is being cancelled (by the runtime's drain)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
