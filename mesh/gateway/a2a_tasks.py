"""A2A tasks as mesh conversations: the task id is the conversation id.

`MeshExecutor` (the SDK's `AgentExecutor`) sends the message to the agent's durable inbox
in the conversation named by the task id, then follows the conversation: live lines give
streamed model tokens (``llm.chunk``) as artifact updates, and the conversation record gives
the task's state:

=================  ==========================================================
record             task state
=================  ==========================================================
running            ``working``
waiting            ``input-required`` (a tool call waits for a person's approval)
done               ``completed``, the last event or reply as the ``result`` artifact
failed             ``failed``, with the dead letter's reason
=================  ==========================================================

``tasks/cancel`` is the mesh's cancellation (mesh.runtime.cancel): every agent process
cancels its handlers of the conversation and refuses the rest; the task is ``canceled``.
`MeshRequestHandler` checks the message against the agent's type before any task exists,
so a bad message is a JSON-RPC error, not a failed task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any, Final

import msgspec
import structlog
from a2a.helpers import new_message, new_task, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.context import ServerCallContext
from a2a.server.events import Event, EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks import TaskUpdater
from a2a.types import (
    CancelTaskRequest,
    GetTaskRequest,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskState,
)
from a2a.types import Message as A2AMessage
from a2a.utils.errors import InvalidParamsError, TaskNotCancelableError, TaskNotFoundError
from a2a.utils.task import apply_history_length

from mesh.gateway.a2a_card import Agents
from mesh.gateway.a2a_parts import chosen_type, handled_types, to_message
from mesh.gateway.a2a_store import (
    AGENT,
    FINISHED,
    PRINCIPAL,
    Place,
    RecordedTasks,
    Running,
    failure_of,
    result_artifact,
    result_of,
)
from mesh.observability import history
from mesh.observability import record as rec
from mesh.observability.tap import TapLine
from mesh.runtime.cancel import Cancel, announce
from mesh.runtime.client import MeshClient
from mesh.wire import subjects
from mesh.wire.messages import Message

MESSAGE: Final = "mesh.message"  # the checked typed message
PLACE: Final = "mesh.place"  # the task's place among the running ones (a2a_store.Running)
DEADLINE: Final = 600.0  # seconds a task's work may take on the mesh (its messages' deadline)
POLL: Final = 0.5  # seconds between reads of the record, at least; the first wait
POLL_MAX: Final = 5.0  # the longest wait between reads, after a long quiet (doubling from POLL)
SETTLE: Final = 0.05  # after a live message, the wait for its record entries
_FINAL: Final = frozenset({rec.HANDLED, rec.DEAD_LETTER, rec.DUPLICATE})
_CHUNK: Final = "llm.chunk"
WORKING: Final = TaskState.TASK_STATE_WORKING
INPUT_REQUIRED: Final = TaskState.TASK_STATE_INPUT_REQUIRED

log = structlog.get_logger("mesh.gateway.a2a")


class MeshRequestHandler(DefaultRequestHandler):
    """The SDK's request handler, with the message checked against the agent's type first."""

    def __init__(
        self,
        mesh: MeshClient,
        agents: Agents,
        executor: AgentExecutor,
        tasks: RecordedTasks,
        running: Running,
        **kwargs: Any,
    ) -> None:
        super().__init__(executor, task_store=tasks, **kwargs)
        self.mesh = mesh
        self.agents = agents
        self.tasks = tasks
        self.running = running

    async def _checked(self, params: SendMessageRequest, context: ServerCallContext) -> None:
        agent = str(context.state[AGENT])
        if params.message.task_id:
            raise InvalidParamsError("a mesh agent takes one message per task: start a new task")
        found = await self.agents.get(agent)
        if found is None:
            raise InvalidParamsError(f"no agent {agent!r} is running on the mesh")
        mtype = chosen_type(params.message, agent, handled_types(found.handles))
        context.state[MESSAGE] = to_message(params.message, mtype)
        context.state[PLACE] = self.running.take(str(context.state.get(PRINCIPAL, "")))

    async def on_message_send(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> Task | A2AMessage:
        await self._checked(params, context)
        try:
            result: Task | A2AMessage = await super().on_message_send(params, context)
        except Exception:
            _release(context)  # no run holds it (or the run's end gave it back already)
            raise
        return result

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        await self._checked(params, context)
        try:
            async for event in super().on_message_send_stream(params, context):
                yield event
        except Exception:
            _release(context)
            raise

    async def on_get_task(self, params: GetTaskRequest, context: ServerCallContext) -> Task | None:
        """This caller's task from memory; any other conversation the agent took part in,
        from the record (read only: it is neither cancelled nor subscribed to over A2A)."""
        try:
            task: Task | None = await super().on_get_task(params, context)
            return task
        except TaskNotFoundError:
            if (found := await self.tasks.read(params.id, context)) is None:
                raise
            return apply_history_length(found, params)

    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        """Only a task this caller started on this gateway; one not running here any more
        (its run ended as it was asked for) is its state as it is, not a wait for nothing."""
        task = await self.tasks.get(params.id, context)
        if task is None:
            raise TaskNotFoundError(
                "only a task this caller started on this gateway is subscribed to (GetTask reads "
                "the others the agent took part in)"
            )
        if task.status.state not in FINISHED and await self._active_task_registry.get(params.id) is None:
            yield task
            return
        async for event in super().on_subscribe_to_task(params, context):
            yield event

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        """The SDK cancels the task (here or in the store); then every agent process cancels
        the conversation's handlers and refuses what still comes for it."""
        if await self.tasks.get(params.id, context) is None:
            raise TaskNotCancelableError(
                "only a task this caller started on this gateway is cancelled over A2A (mesh cancel "
                "stops any conversation)"
            )
        task: Task | None = await super().on_cancel_task(params, context)
        conv = subjects.conversation_id(params.id)
        by = str(context.state.get(PRINCIPAL, "a2a"))
        body = msgspec.json.encode(Cancel(reason="cancelled over A2A (tasks/cancel)", by=by))
        await announce(self.mesh.transport, conv, body)
        await self.mesh.transport.flush()
        log.info("a2a task cancelled", conversation=conv, by=by)
        return task


class MeshExecutor(AgentExecutor):
    """Runs an A2A task as a mesh conversation (see the module's docstring)."""

    def __init__(self, mesh: MeshClient) -> None:
        self.mesh = mesh

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        state = context.call_context.state
        agent, msg = str(state[AGENT]), state[MESSAGE]
        assert isinstance(msg, Message) and context.task_id and context.context_id
        asked = [context.message] if context.message is not None else []
        submitted = TaskState.TASK_STATE_SUBMITTED
        await event_queue.enqueue_event(
            new_task(context.task_id, context.context_id, submitted, history=asked)
        )
        task = Run(self.mesh, agent, TaskUpdater(event_queue, context.task_id, context.context_id))
        try:
            await task.run(msg)
        finally:
            _release(context.call_context)  # its place, for the caller's next task

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """The task's state; the mesh's cancellation is the request handler's
        (`MeshRequestHandler.on_cancel_task`), sent once the SDK has cancelled the task."""
        assert context.task_id and context.context_id
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


class Run:
    """One task's run: send, then follow the conversation to its end."""

    def __init__(self, mesh: MeshClient, agent: str, updater: TaskUpdater) -> None:
        self.mesh = mesh
        self.agent = agent
        self.updater = updater
        self.conv = subjects.conversation_id(updater.task_id)
        self.lines: asyncio.Queue[TapLine] = asyncio.Queue(maxsize=1024)
        self.streams: set[str] = set()

    def _on_line(self, line: TapLine) -> None:
        if not self.lines.full():  # a slow reader loses tokens, never the gateway's memory
            self.lines.put_nowait(line)

    async def run(self, msg: Message) -> None:
        sub = await history.follow(self.mesh.transport, self.conv, self._on_line, full=True)
        try:
            sent = await self.mesh.send(self.agent, msg, conversation=self.conv, deadline=DEADLINE)
            await self.updater.start_work()
            await self._follow(sent.id, time.monotonic() + DEADLINE + 10 * POLL)
        finally:
            await sub.unsubscribe()

    async def _follow(self, sent: str, give_up: float) -> None:
        """Read the record when a message of the conversation came live (after `SETTLE`, and
        at most once per `POLL`: streamed tokens cause no read), else after a wait that
        doubles while nothing changes, up to `POLL_MAX`: a long conversation is not read
        again and again in full."""
        shown, wait = WORKING, POLL
        read_at = last_read = time.monotonic()
        read_at += POLL
        while (now := time.monotonic()) < give_up:
            if now < read_at:  # till then, live lines (a steady stream of them delays no read)
                line = await self._next_line(min(read_at, give_up) - now)
                if line is not None and await self._live(line):  # its record entries come soon
                    wait = POLL
                    read_at = min(read_at, max(last_read + POLL, time.monotonic() + SETTLE))
                continue
            messages = await history.conversation(self.mesh.transport, self.conv)
            last_read = time.monotonic()
            wait = min(wait * 2, POLL_MAX)
            read_at = last_read + wait
            ours = next((m for m in messages if m.id == sent), None)
            if ours is None or not any(d.outcome in _FINAL for d in ours.deliveries):
                continue  # not yet taken, or not yet handled
            status = history.summarize(self.conv, messages).status
            if status == history.DONE:
                await self._completed(messages)
                return
            if status == history.FAILED:
                await self.updater.failed(self._said(failure_of(messages)))
                return
            now_shown = INPUT_REQUIRED if status == history.WAITING else WORKING
            if now_shown != shown:
                shown, wait = now_shown, POLL
                read_at = last_read + POLL
                await self.updater.update_status(now_shown, self._said(_waiting(status)))
        await self.updater.failed(
            self._said(f"no end within {DEADLINE:g}s; the gateway stopped following it")
        )

    async def _next_line(self, within: float) -> TapLine | None:
        if not self.lines.empty():
            return self.lines.get_nowait()
        try:
            return await asyncio.wait_for(self.lines.get(), max(within, 0.001))
        except TimeoutError:
            return None

    async def _live(self, line: TapLine) -> bool:
        """A streamed token becomes an artifact update of that stream (appended to); any other
        line is a message of the conversation (True: the record will have it)."""
        if line.type != _CHUNK:
            return True
        if not isinstance(line.body, dict):
            return False
        text, stream = line.body.get("text"), str(line.body.get("stream", ""))
        if not isinstance(text, str) or not stream:
            return False
        first = stream not in self.streams
        self.streams.add(stream)
        await self.updater.add_artifact(
            [new_text_part(text)], artifact_id=f"stream-{stream}"[:128], name="stream", append=not first
        )
        return False

    async def _completed(self, messages: list[history.Recorded]) -> None:
        last = result_of(messages)
        if last is None:
            await self.updater.complete(self._said(f"{self.agent} finished without an answer"))
            return
        artifact = result_artifact(last)
        parts = list(artifact.parts)
        await self.updater.add_artifact(
            parts, artifact_id=artifact.artifact_id, name=artifact.name, metadata={"mesh.type": last.type}
        )
        await self.updater.complete(new_message(parts, self.updater.context_id, self.updater.task_id))

    def _said(self, text: str) -> A2AMessage:
        return new_text_message(text, context_id=self.updater.context_id, task_id=self.updater.task_id)


def _release(context: ServerCallContext) -> None:
    place = context.state.get(PLACE)
    if isinstance(place, Place):
        place.release()


def _waiting(status: str) -> str:
    if status == history.WAITING:
        return "a tool call waits for a person's approval (mesh approvals)"
    return "working"
