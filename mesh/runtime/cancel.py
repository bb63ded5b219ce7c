"""Stopping a conversation: `mesh cancel <conversation>`, and deadlines that end running work.

A cancellation is a core NATS message on ``mesh.<conversation>.cancel.all``, which every
agent process hears (no queue group: every replica must). Each process then:

- cancels its handlers of that conversation that are running: the handler's task is
  cancelled, and with it the model call or tool it awaits (an HTTP request to the model is
  aborted; a tool's coroutine is cancelled). The message is dead-lettered as ``cancelled``
  and acknowledged (not retried), and a requester waiting on a direct message is told why;
- refuses what still arrives for that conversation (handoffs already in inboxes, answers,
  timers), dead-lettering it as ``cancelled``: no further handoffs;
- answers, if the cancellation asked for answers, with how many handlers it cancelled.

Who may cancel is a server permission: the operator and publisher roles may publish on
``mesh.*.cancel.*``; agents may only listen (mesh.transport.auth). A cancellation is also
kept in ``MESH_CANCELS`` (``mesh_cancelled.<conversation>``, for ``MESH_RECORD_RETENTION``),
which every agent process reads as it starts, before it takes any message: a replica
started after a cancellation (a scale-out, a restart) refuses that conversation too. A
process remembers the newest `REMEMBERED` cancellations.

A deadline (``Mesh-Deadline``) bounds a handler the same way: past it, the handler is
cancelled and its message dead-lettered as ``deadline_exceeded`` (a message already past its
deadline on arrival is ``deadline_expired``, before any handler runs).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog

from mesh.transport.delivery import Later
from mesh.transport.streams import CANCELS
from mesh.wire import subjects
from mesh.wire.errors import DeliveryError

if TYPE_CHECKING:
    from mesh.runtime.ladder import Take, Work
    from mesh.transport.base import Subscription, Transport

REMEMBERED: Final = 10_000  # cancelled conversations a process keeps refusing
MAX_REASON: Final = 500

log = structlog.get_logger("mesh.cancel")


class Cancel(msgspec.Struct, frozen=True):
    """The body of a cancellation (JSON): why, and who says so (for people to read)."""

    reason: str = ""
    by: str = ""


class Answer(msgspec.Struct, frozen=True):
    """What one agent process did with a cancellation."""

    agent: str
    instance: str
    cancelled: int


_decode = msgspec.json.Decoder(Cancel).decode


def _body(data: bytes) -> Cancel:
    """A cancellation's body; an empty or undecodable one says nothing (it still cancels)."""
    try:
        return _decode(data) if data else Cancel()
    except msgspec.DecodeError:
        return Cancel()


def _why(data: bytes) -> str:
    """The reason its dead letters give, in one line of bounded length."""
    body = _body(data)
    said = " ".join(body.reason.split())[:MAX_REASON]
    by = " ".join(body.by.split())[:64]
    return "the conversation was cancelled" + (f" by {by}" if by else "") + (f": {said}" if said else "")


async def announce(transport: Transport, conversation: str, body: bytes, reply: str = "") -> None:
    """Cancel `conversation` on the mesh: keep it in MESH_CANCELS (for agent processes that
    start later), then tell every running process. The broadcast goes even if keeping it
    failed (said in the log): the processes running now matter most."""
    try:
        await transport.store(subjects.cancelled_subject(conversation), body)
    except Exception as exc:
        log.warning("cancellation not kept for later processes", conversation=conversation, error=str(exc))
    await transport.publish(subjects.Address.cancel(conversation).subject, body, reply=reply)


class Cancellations:
    """One process's running handlers by conversation, and the conversations it was told
    to stop."""

    def __init__(self, transport: Transport, agent: str, instance: str) -> None:
        self.transport = transport
        self.agent = agent
        self.instance = instance
        self._running: dict[str, set[asyncio.Task[Any]]] = {}
        self._stopped: OrderedDict[str, str] = OrderedDict()  # conversation -> why
        self._by_us: dict[asyncio.Task[Any], str] = {}  # tasks cancelled here -> why

    async def start(self) -> Subscription:
        """Hear cancellations from now on, then read those kept from before (so none falls
        between the two); the subscription, to drain with the others."""
        sub = await self.transport.subscribe(subjects.cancel_pattern(), self.on_cancel)
        kept = await self.read_kept()
        if kept:
            log.info("cancelled conversations read", count=kept)
        return sub

    async def read_kept(self) -> int:
        """The newest `REMEMBERED` cancellations kept in MESH_CANCELS, as refused conversations
        (nothing of theirs runs here yet); how many. A server without the stream (made by
        `mesh up` and `mesh agents add`) has none to give, which is said in the log."""
        try:
            first, last = await self.transport.stream_bounds(CANCELS)
        except Exception as exc:
            log.warning("kept cancellations not read", stream=CANCELS, error=str(exc))
            return 0
        seq, count = max(first, last - REMEMBERED + 1, 1), 0
        while last and seq <= last:
            batch = await self.transport.stored_many(CANCELS, seq, f"{subjects.CANCELLED_ROOT}.*")
            if not batch:
                break
            for m in batch:
                conversation = str(m.subject).partition(".")[2]
                if subjects.is_conversation_id(conversation):
                    self._stop(conversation, _why(bytes(m.data or b"")))
                    count += 1
            seq = int(batch[-1].seq) + 1
        return count

    def stopped(self, conversation: str) -> str | None:
        """Why the conversation was cancelled, if it was."""
        return self._stopped.get(conversation)

    def _stop(self, conversation: str, reason: str) -> None:
        self._stopped[conversation] = reason
        self._stopped.move_to_end(conversation)
        while len(self._stopped) > REMEMBERED:
            self._stopped.popitem(last=False)

    def cancel(self, conversation: str, reason: str) -> int:
        """Stop a conversation here: cancel its running handlers; how many there were."""
        self._stop(conversation, reason)
        tasks = [t for t in self._running.get(conversation, ()) if not t.done()]
        for task in tasks:
            self._by_us[task] = reason
            task.cancel()
        return len(tasks)

    async def on_cancel(self, msg: Any) -> None:
        """A cancellation arrived (``mesh.<conversation>.cancel.all``)."""
        address = subjects.parse(msg.subject)
        if address is None or not subjects.is_conversation_id(address.conversation):
            return
        reason = _why(msg.data)
        by = _body(msg.data).by
        count = self.cancel(address.conversation, reason)
        log.info("conversation cancelled", conversation=address.conversation, handlers=count, by=by)
        if msg.reply:
            answer = msgspec.json.encode(Answer(self.agent, self.instance, count))
            await self.transport.publish(msg.reply, answer)

    def rung(self, below: Take) -> Take:
        """A ladder rung: refuse a stopped conversation's message, and run the handler so that
        a cancellation or its deadline ends it with a dead letter (not a retry)."""

        async def run(w: Work) -> Later | None:
            env = w.env
            assert env is not None
            conversation = env.conversation
            why = self.stopped(conversation)
            if why is not None:
                raise DeliveryError("cancelled", why)
            task = asyncio.current_task()
            assert task is not None
            self._running.setdefault(conversation, set()).add(task)
            limit = None if env.deadline_ms is None else asyncio.timeout(env.deadline_ms / 1000 - time.time())
            try:
                if limit is None:  # no deadline: no timer to schedule and cancel per delivery
                    return await below(w)
                async with limit:
                    return await below(w)
            except asyncio.CancelledError:
                why = self._by_us.pop(task, None)
                if why is None:
                    raise  # a stop of the agent, not of the conversation
                task.uncancel()
                raise DeliveryError("cancelled", why) from None
            except TimeoutError:
                if limit is None or not limit.expired():
                    raise  # a timeout inside the handler: its own failure
                raise DeliveryError(
                    "deadline_exceeded", f"the deadline {env.deadline_ms} ms passed while it was handled"
                ) from None
            finally:
                running = self._running.get(conversation)
                if running is not None:
                    running.discard(task)
                    if not running:
                        del self._running[conversation]
                self._by_us.pop(task, None)

        return run
