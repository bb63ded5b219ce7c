"""Where the gateway keeps A2A tasks: in memory while it runs them, and in the conversation
record for good.

`RecordedTasks` is the SDK's in-memory task store, scoped to the caller and the agent
(`owner`): its `get` finds only the tasks this caller started here, so the SDK's owner
checks (GetTask, CancelTask, SubscribeToTask, its cache of running tasks) hold. Only
GetTask reads a task it does not hold (dropped, started over REST, before the gateway
restarted, or by another gateway) from the conversation record, whose id is the task id
(`recorded_task`): its state from the record's status, its result artifact from the
conversation's last answer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from a2a.helpers import new_artifact, new_task
from a2a.server.context import ServerCallContext
from a2a.server.tasks import InMemoryTaskStore
from a2a.types import Artifact, Task, TaskState

from mesh.gateway.a2a_parts import answer_parts
from mesh.observability import history
from mesh.observability import record as rec
from mesh.runtime.client import MeshClient
from mesh.wire import subjects

AGENT: Final = "mesh.agent"  # call-context state: the agent named by the URL
PRINCIPAL: Final = "mesh.principal"  # who called (token:<name>)
KEPT: Final = 10_000  # finished tasks kept in memory; older ones are read from the record
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


class RecordedTasks(InMemoryTaskStore):
    def __init__(self, mesh: MeshClient) -> None:
        super().__init__(owner_resolver=owner)
        self.mesh = mesh
        self._finished: OrderedDict[tuple[str, str], ServerCallContext] = OrderedDict()

    async def save(self, task: Task, context: ServerCallContext) -> None:
        await super().save(task, context)
        if task.status.state in FINISHED:
            self._finished[(owner(context), task.id)] = context
            self._finished.move_to_end((owner(context), task.id))
            while len(self._finished) > KEPT:
                (_, dropped), by = self._finished.popitem(last=False)
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
