"""Where the gateway keeps A2A tasks: in memory while it runs them, and in the conversation
record for good.

`RecordedTasks` is the SDK's in-memory task store, scoped to the caller and the agent
(`owner`), holding at most `KEPT` finished tasks and `KEPT_BYTES` of them (their history,
the caller's message, and artifacts): older finished ones are dropped from memory. Its `get`
finds only the tasks this caller started here, so the SDK's owner checks (GetTask,
CancelTask, SubscribeToTask, its cache of running tasks) hold. Only GetTask reads a task it
does not hold (dropped, started over REST, before the gateway restarted, or by another
gateway) from the conversation record, whose id is the task id (`recorded_task`): its state
from the record's status, its result artifact from the conversation's last answer.
`Running` caps the tasks being run, per caller and in all.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from a2a.helpers import new_artifact, new_task
from a2a.server.context import ServerCallContext
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import Artifact, Task, TaskState
from a2a.utils.errors import InvalidRequestError

from mesh.gateway.a2a_parts import answer_parts
from mesh.observability import history
from mesh.observability import record as rec
from mesh.runtime.client import MeshClient
from mesh.wire import subjects

AGENT: Final = "mesh.agent"  # call-context state: the agent named by the URL
PRINCIPAL: Final = "mesh.principal"  # who called (token:<name>)
KEPT: Final = 10_000  # finished tasks kept in memory; older ones are read from the record
KEPT_BYTES: Final = 64 * 1024 * 1024  # and at most this much of them (serialized)
PER_CALLER: Final = 64  # tasks one principal may have running at once
RUNNING: Final = 1024  # tasks the gateway runs at once, all callers together
SENDER: Final = "gateway"
FINISHED: Final = frozenset(
    {
        TaskState.TASK_STATE_COMPLETED,
        TaskState.TASK_STATE_FAILED,
        TaskState.TASK_STATE_CANCELED,
        TaskState.TASK_STATE_REJECTED,
    }
)
_RESULT_KINDS: Final = (subjects.EVENT, subjects.REPLY)
_CANCELLED: Final = "the conversation was cancelled"  # how mesh.runtime.cancel words it


def owner(context: ServerCallContext) -> str:
    """Whose tasks: a caller sees and cancels only the tasks it started, with that agent."""
    return f"{context.state.get(PRINCIPAL, '')}/{context.state.get(AGENT, '')}"


class Running:
    """The tasks being run: at most `per_caller` of one principal and `total` of all. A task
    takes its place before it exists (`take`) and gives it back when its run ends."""

    def __init__(self, *, per_caller: int = PER_CALLER, total: int = RUNNING) -> None:
        self.per_caller = per_caller
        self.total = total
        self.by: dict[str, int] = {}

    def take(self, principal: str) -> Place:
        mine, everyone = self.by.get(principal, 0), sum(self.by.values())
        if mine >= self.per_caller:
            raise InvalidRequestError(
                f"this caller's running tasks: {mine}, at most {self.per_caller}: wait for one to end",
                data={"reason": "too_many_tasks", "running": mine, "limit": self.per_caller},
            )
        if everyone >= self.total:
            raise InvalidRequestError(
                f"the gateway's running tasks: {everyone}, at most {self.total}: try again later",
                data={"reason": "gateway_busy", "running": everyone, "limit": self.total},
            )
        self.by[principal] = mine + 1
        return Place(self, principal)


class Place:
    """One running task's place; given back once, however often `release` is called."""

    def __init__(self, running: Running, principal: str) -> None:
        self.running, self.principal, self.held = running, principal, True

    def release(self) -> None:
        if self.held:
            self.held = False
            left = self.running.by[self.principal] - 1
            if left:
                self.running.by[self.principal] = left
            else:
                del self.running.by[self.principal]


class RecordedTasks(InMemoryTaskStore):
    def __init__(self, mesh: MeshClient, *, kept: int = KEPT, kept_bytes: int = KEPT_BYTES) -> None:
        super().__init__(owner_resolver=owner)
        self.mesh = mesh
        self.kept, self.kept_bytes = kept, kept_bytes
        self.finished_bytes = 0
        # finished tasks, oldest first: who saved them (to delete them as) and their size
        self._finished: OrderedDict[tuple[str, str], tuple[ServerCallContext, int]] = OrderedDict()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        await super().save(task, context)
        if task.status.state in FINISHED:
            key = (owner(context), task.id)
            if (before := self._finished.pop(key, None)) is not None:
                self.finished_bytes -= before[1]
            size = task.ByteSize()
            self._finished[key] = (context, size)
            self.finished_bytes += size
            while len(self._finished) > self.kept or self.finished_bytes > self.kept_bytes:
                (_, dropped), (by, dropped_size) = self._finished.popitem(last=False)
                self.finished_bytes -= dropped_size
                await super().delete(dropped, by)

    async def read(self, task_id: str, context: ServerCallContext) -> Task | None:
        """The task as GetTask gives it: this caller's own from memory, else the record's."""
        found = await self.get(task_id, context)
        if found is not None or not subjects.is_conversation_id(task_id):
            return found
        return await recorded_task(self.mesh, task_id, str(context.state.get(AGENT, "")))


async def recorded_task(mesh: MeshClient, conversation: str, agent: str) -> Task | None:
    """The task a conversation is, as its record tells: None if nothing is recorded, or if
    `agent` took no part in it."""
    messages = await history.conversation(mesh.transport, conversation)
    if not messages:
        return None
    summary = history.summarize(conversation, messages)
    if agent not in summary.agents:
        return None
    artifacts = []
    if summary.status == history.DONE:
        state = TaskState.TASK_STATE_COMPLETED
        last = result_of(messages)
        artifacts = [result_artifact(last)] if last is not None else []
    elif summary.status == history.FAILED:
        cancelled = _CANCELLED in failure_of(messages)
        state = TaskState.TASK_STATE_CANCELED if cancelled else TaskState.TASK_STATE_FAILED
    elif summary.status == history.WAITING:
        state = TaskState.TASK_STATE_INPUT_REQUIRED
    else:
        state = TaskState.TASK_STATE_WORKING
    return new_task(conversation, conversation, state, artifacts=artifacts)


def result_of(messages: list[history.Recorded]) -> history.Recorded | None:
    """A conversation's answer: its last event or reply not sent by the gateway."""
    return next(
        (m for m in reversed(messages) if m.kind in _RESULT_KINDS and m.sender not in (SENDER, "")),
        None,
    )


def result_artifact(message: history.Recorded) -> Artifact:
    artifact = new_artifact(
        answer_parts(message.body()), name="result", description=f"a {message.type} from {message.sender}"
    )
    artifact.metadata.update({"mesh.type": message.type})
    return artifact


def failure_of(messages: list[history.Recorded]) -> str:
    """Why a conversation failed: its first dead letter's agent, type and reason."""
    for m in messages:
        for d in m.deliveries:
            if d.outcome == rec.DEAD_LETTER:
                return f"{d.agent} could not handle a {m.type}: {d.reason}"
    return "the conversation failed (mesh show for its record)"
