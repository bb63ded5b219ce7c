"""Human approval of high-risk tool calls, parked durably.

When the model calls a tool marked ``approval=True``, the tool loop does not wait in
memory. It stores the conversation with the model so far in the ``MESH_STATE`` bucket
(key ``approvals.<agent>.<id>``: only that agent may write its keys), publishes an
``approval.request`` event in the conversation, sends itself an expiry timer, and the handler
returns: the message is acknowledged and nothing is held. A decision is an
``approval.decision`` message sent to the agent's timer subject (``mesh approve <id>``,
``mesh deny <id> --reason ...``, or a NATS client with the operator role: no one else may
publish there). The agent process that receives it (any replica, or one started after a
restart) records it with compare-and-set, with the identity that sent it (not the body's
``by``), and sends the original message to itself again; the handler runs again, the tool
loop finds the stored conversation and goes on from the parked call: if approved, it claims
the call (compare-and-set) and runs the tool, at most once however often the resumed message
comes; if denied, it tells the model. If no decision comes before the deadline, the request
expires: ``approval.resolved`` says so and the original message is dead-lettered as
``approval_expired`` with the reason.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from mesh.llm.tools import ToolError
from mesh.llm.types import ToolCall, ToolOutput, Turn
from mesh.observability.tracing import continuing, current_traceparent
from mesh.runtime import timers
from mesh.runtime.client import Lineage
from mesh.runtime.deadletter import dead_letter
from mesh.runtime.keepers import Outcome
from mesh.transport.delivery import Later
from mesh.transport.streams import EVENTS
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import default_codec
from mesh.wire.envelope import derive_id
from mesh.wire.errors import DeliveryError
from mesh.wire.messages import Message, message
from mesh.wire.senders import sender_of

if TYPE_CHECKING:
    from mesh.agent.context import Context
    from mesh.agent.declaration import Agent
    from mesh.llm.tools import Tool
    from mesh.transport.base import Transport
    from mesh.transport.state import StateStore

Status = Literal["pending", "approved", "denied", "expired"]


@message("approval.request")
class ApprovalRequest(Message, frozen=True):
    """A tool call waits for a person: answer with `ApprovalDecision` to the agent's inbox."""

    approval: str
    agent: str
    tool: str
    arguments: str  # the call's arguments as JSON
    expires_ms: int
    decide_on: str  # the subject a decision is sent to


@message("approval.decision")
class ApprovalDecision(Message, frozen=True):
    """A decision on a parked call. `by` is a name for people to read (who pressed the
    button); the decision is recorded with the identity that sent it."""

    approval: str
    approved: bool
    by: str = ""
    reason: str = ""


@message("approval.resolved")
class ApprovalResolved(Message, frozen=True):
    """What became of an approval request: approved, denied or expired. `by` is the
    identity that sent the decision; `person` what the decision said (`ApprovalDecision.by`)."""

    approval: str
    status: str
    by: str = ""
    reason: str = ""
    person: str = ""


@message("mesh.approval_timer")
class ApprovalTimer(Message, frozen=True):
    """An approval's expiry, sent by an agent to its own inbox when it parks a call."""

    approval: str
    due_ms: int


class ApprovalState(msgspec.Struct):
    id: str
    agent: str
    conversation: str
    tool: str
    call: ToolCall
    transcript: list[Turn]
    outputs: list[ToolOutput]
    expires_ms: int
    # the parked message, sent again on a decision
    message_id: str
    message_type: str
    message_version: int | None
    content_type: str
    data: str  # base64
    hop: int
    reply_to: str = ""
    reply_grant: str = ""  # its owner's Mesh-Reply-Grant, passed on with it
    join: str = ""
    route: list[str] = []
    depth: int = 0
    status: Status = "pending"
    by: str = ""  # the identity that sent the decision
    reason: str = ""
    decided_by_msg: str = ""  # the decision (or timer) message that resolved it
    resume_id: str = ""  # the id of the re-sent message
    person: str = ""  # who the decision says decided (display only)
    run: Literal["", "claimed", "done"] = ""  # the approved call: claimed before it runs
    output: str = ""  # what it returned (or its error), once done
    failed: str = ""  # the error kind when it failed
    parked_ms: int = 0  # when the call was parked (0: parked by an older version)
    traceparent: str = ""  # the parking handler's span: the decision and the resumed run continue it


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(ApprovalState).decode


async def pending(store: StateStore) -> list[ApprovalState]:
    """Every approval still waiting for a decision, oldest first (an operator's view: it
    reads every agent's approvals)."""
    found = []
    for key in await store.keys(approval_key("*", "*")):
        got = await store.get(key)
        if got is not None and (st := decoded(got[0])).status == "pending":
            found.append(st)
    return sorted(found, key=lambda st: (st.parked_ms, st.expires_ms))


async def waiting_counts(transport: Transport) -> dict[str, int]:
    """Approvals waiting for a decision, per agent, from the stored ``approval.request`` and
    ``approval.resolved`` events (`mesh agents`: the observer may read those, not the state)."""
    asked: dict[str, str] = {}  # approval id -> agent
    resolved: set[str] = set()
    pattern, seq = subjects.event_pattern("approval.*"), 1
    while batch := await transport.stored_many(EVENTS, seq, pattern):
        for m in batch:
            body = _any_json(m.data)
            approval = str(body.get("approval", "")) if isinstance(body, dict) else ""
            if str(m.subject).endswith(".approval.request"):
                asked[approval] = str(body.get("agent", "")) if isinstance(body, dict) else ""
            elif str(m.subject).endswith(".approval.resolved"):
                resolved.add(approval)
        seq = int(batch[-1].seq) + 1
    counts: dict[str, int] = {}
    for approval, agent in asked.items():
        if approval not in resolved:
            counts[agent] = counts.get(agent, 0) + 1
    return counts


def _any_json(data: bytes) -> object:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return None


def approval_key(agent: str, approval_id: str) -> str:
    """Where an approval's state is kept: under the agent's own keys, which only it (and the
    operator) may write (mesh.transport.auth)."""
    return f"approvals.{agent}.{approval_id}"


def decision_subject(conversation: str, agent: str) -> str:
    """Where a decision goes: the agent's timer subject, which only the agent itself and the
    operator role may publish to (docs/security.md), not its inbox, where anyone may send."""
    return subjects.Address.timer(conversation, agent).subject


class ApprovalDenied(ToolError):
    kind = "denied"


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a parked tool loop goes on: the stored conversation and the decision."""

    transcript: list[Turn]
    outputs: list[ToolOutput]
    call_id: str
    status: Status
    by: str
    reason: str
    key: str = ""

    def refusal(self) -> ToolError | None:
        if self.status == "approved":
            return None
        by = f" by {self.by}" if self.by else ""
        return ApprovalDenied("?", f"a person denied this call{by}: {self.reason or 'no reason given'}")


async def park(
    ctx: Context, tool: Tool, call: ToolCall, transcript: list[Turn], outputs: list[ToolOutput]
) -> str:
    """Store the tool loop, ask for a decision, arm the expiry; returns the approval id."""
    keeper = ctx.approvals
    if keeper is None:
        raise ToolError(tool.name, "needs approval, which only works in a handler run by the mesh runtime")
    env = ctx.envelope
    approval_id = derive_id(env.id, ctx.agent, 0)
    now_ms = int(time.time() * 1000)
    due = now_ms + int(keeper.timeout * 1000)
    state = ApprovalState(
        parked_ms=now_ms,
        traceparent=current_traceparent(),
        id=approval_id,
        agent=ctx.agent,
        conversation=ctx.conversation_id,
        tool=tool.name,
        call=call,
        transcript=transcript,
        outputs=outputs,
        expires_ms=due,
        message_id=env.id,
        message_type=env.type_name,
        message_version=env.version,
        content_type=env.content_type,
        data=base64.b64encode(env.data).decode(),
        hop=env.hop,
        reply_to=ctx.answer.reply_to,
        reply_grant=ctx.answer.reply_grant,
        join=ctx.answer.join,
        route=list(ctx.answer.route),
        depth=ctx.depth,
    )
    # None: made by an earlier run
    await keeper.state.create(approval_key(ctx.agent, approval_id), _encode(state))
    inbox = decision_subject(ctx.conversation_id, ctx.agent)
    await ctx.publish(
        ApprovalRequest(
            approval=approval_id,
            agent=ctx.agent,
            tool=tool.name,
            arguments=msgspec.json.encode(call.input).decode(),
            expires_ms=due,
            decide_on=inbox,
        )
    )
    timer = Lineage(conversation=ctx.conversation_id, causation=env.id, hop=env.hop, depth=ctx.depth)
    await ctx.emit(
        subjects.Address.timer(ctx.conversation_id, ctx.agent),
        ApprovalTimer(approval=approval_id, due_ms=due),
        timer,
    )
    ctx.log.info("tool call parked for approval", tool=tool.name, approval=approval_id)
    return approval_id


async def resume_point(ctx: Context) -> Resume | None:
    """If this message is the re-send of a decided approval, where its tool loop goes on."""
    keeper = ctx.approvals
    if keeper is None or not ctx.envelope.causation:
        return None
    key = approval_key(ctx.agent, derive_id(ctx.envelope.causation, ctx.agent, 0))
    got = await keeper.state.get(key)
    if got is None:
        return None
    st = _decode(got[0])
    if st.resume_id != ctx.message_id or st.status not in ("approved", "denied"):
        return None
    return Resume(st.transcript, st.outputs, st.call.id, st.status, st.person or st.by, st.reason, key)


@dataclass(frozen=True, slots=True)
class Ran:
    """An approved call that already ran, from an earlier run of the same resumed message."""

    output: str
    failed: str  # its error kind, "" if it succeeded


async def claim(ctx: Context, resume: Resume) -> Ran | ToolError | None:
    """Claim the approved call before it runs: None when this run may run it now; `Ran` when
    it ran already (a redelivered or replayed resume: give back what it returned); a
    `ToolError` when an earlier run claimed it and stopped before saying how it went (the
    call may or may not have happened, so it is not run again)."""
    keeper = ctx.approvals
    assert keeper is not None
    while True:
        got = await keeper.state.get(resume.key)
        if got is None:
            return ToolError("?", "the approval's state is gone; the call is not run")
        st = _decode(got[0])
        if st.run == "done":
            ctx.log.warning("approved call already ran: not run again", approval=st.id, tool=st.tool)
            return Ran(st.output, st.failed)
        if st.run == "claimed":
            return ToolError(
                "?",
                f"approval {st.id} was claimed by an earlier run that stopped before it finished; "
                "the call is not run twice: check whether it happened",
            )
        st.run = "claimed"
        if await keeper.state.update(resume.key, _encode(st), got[1]) is not None:
            return None


async def ran(ctx: Context, resume: Resume, output: str, failed: str = "") -> None:
    """Record what the claimed call returned, so a later run of the same resume reuses it."""
    keeper = ctx.approvals
    assert keeper is not None
    while True:
        got = await keeper.state.get(resume.key)
        if got is None:
            return
        st = _decode(got[0])
        st.run, st.output, st.failed = "done", output, failed
        if await keeper.state.update(resume.key, _encode(st), got[1]) is not None:
            return


class ApprovalKeeper:
    """Runs the decisions and expiry timers of one agent's parked tool calls. A `Keeper`
    (mesh.runtime.keepers): it takes decisions and its timers, for an agent with tools."""

    takes: tuple[type[Message], ...] = (ApprovalDecision, ApprovalTimer)
    answers = False

    def __init__(self, agent: Agent, state: StateStore, timeout: float, max_deliver: int) -> None:
        self.agent = agent
        self.state = state
        self.timeout = timeout
        self.max_deliver = max_deliver

    def owns(self, env: h.Envelope) -> bool:
        return len(self.agent.tools) > 0

    async def receive(self, env: h.Envelope, ctx: Context) -> Outcome | Later:
        status: Status
        if env.type_name == "mesh.approval_timer":
            timer = default_codec.decode(env.data, ApprovalTimer, env.content_type)
            waiting = await timers.wait(env, ctx, timer, timer.due_ms, self.max_deliver)
            if waiting is not None:
                return "handled" if waiting == "rearmed" else waiting
            approval_id, status, by, reason = timer.approval, "expired", "", "no decision before it expired"
            person = ""
        else:
            if env.address.kind != subjects.TIMER:
                raise DeliveryError(
                    "unauthorized",
                    f"an approval decision came on {h.show(env.subject)}: decisions are taken only on the "
                    f"agent's timer subject ({decision_subject(env.conversation, self.agent.name)}), which "
                    f"only the operator role may publish to",
                )
            by = sender_of(env)
            if by == self.agent.name:
                raise DeliveryError(
                    "unauthorized",
                    f"{self.agent.name!r} sent a decision on its own tool call: a person decides",
                )
            decision = default_codec.decode(env.data, ApprovalDecision, env.content_type)
            approval_id, person, reason = decision.approval, decision.by, decision.reason
            status = "approved" if decision.approved else "denied"
        if not h.is_id_token(approval_id):  # it goes into a KV key: no wildcards, no 10 KB
            raise DeliveryError("unknown_approval", f"{h.show(approval_id)} is not an approval id")
        # drawn first on every delivery of this message, so a redelivery finds the same id,
        # and approval.resolved (sent next, through the same counter) gets another one
        resume_id = ctx.next_id()
        key = approval_key(self.agent.name, approval_id)
        while True:
            got = await self.state.get(key)
            if got is None:  # never parked here, or its state expired
                raise DeliveryError(
                    "unknown_approval", f"no approval {approval_id!r} waits on {self.agent.name!r}"
                )
            st = _decode(got[0])
            if st.status != "pending":
                if st.decided_by_msg != env.id:
                    return "skipped"  # decided already (a second answer, or the timer after it)
                break  # a redelivery of the deciding message: finish its work again
            st.status, st.by, st.reason, st.decided_by_msg = status, by, reason, env.id
            st.person = person
            st.resume_id = resume_id
            if await self.state.update(key, _encode(st), got[1]) is not None:
                if ctx.audit is not None:
                    await ctx.audit.append(
                        "approval",
                        actor=by or self.agent.name,  # the decider's identity; the agent for an expiry
                        trace_id=ctx.trace_id,
                        conversation=st.conversation,
                        detail={"approval": st.id, "tool": st.tool, "status": st.status, "person": st.person},
                    )
                break
        await ctx.publish(
            ApprovalResolved(approval=st.id, status=st.status, by=st.by, reason=st.reason, person=st.person)
        )
        if st.status == "expired":
            await self._expire(st, ctx)
        else:
            await self._resend(st, ctx)
        return "handled"

    async def _resend(self, st: ApprovalState, ctx: Context) -> None:
        handler = self.agent.handler_for(st.message_type, st.message_version)
        if handler is None:
            raise DeliveryError("unknown_type", f"{self.agent.name!r} no longer handles {st.message_type}")
        original = default_codec.decode(base64.b64decode(st.data), handler.mtype.cls, st.content_type)
        lineage = Lineage(
            conversation=st.conversation,
            causation=st.message_id,  # how the re-run finds this state
            hop=st.hop,
            reply_to=st.reply_to,
            reply_grant=st.reply_grant,
            join=st.join,
            route=tuple(st.route),
            depth=st.depth,
        )
        address = subjects.Address.inbox(st.conversation, self.agent.name)
        with continuing(st.traceparent):  # the conversation's trace, whoever decided
            await ctx.emit(address, original, lineage, st.content_type, msg_id=st.resume_id)

    async def _expire(self, st: ApprovalState, ctx: Context) -> None:
        parked = SimpleNamespace(
            subject=subjects.Address.inbox(st.conversation, self.agent.name).subject,
            data=base64.b64decode(st.data),
            headers={
                h.TYPE: st.message_type,
                h.ID: st.message_id,
                h.CONVERSATION: st.conversation,
                h.CONTENT_TYPE: st.content_type,
            },
        )
        reason = f"tool {st.tool!r} waited for approval {st.id} and expired without a decision"
        secret = ctx.settings.secret_header_names if ctx.settings is not None else frozenset()
        if not await dead_letter(
            ctx.transport,
            agent=self.agent.name,
            msg=parked,
            kind="approval_expired",
            reason=reason,
            secret_headers=secret,
        ):
            raise RuntimeError("the expired approval's message could not be dead-lettered; retrying")


def decoded(raw: bytes) -> ApprovalState:
    return _decode(raw)


def summary(st: ApprovalState) -> dict[str, Any]:
    return {
        "id": st.id,
        "agent": st.agent,
        "conversation": st.conversation,
        "tool": st.tool,
        "arguments": st.call.input,
        "status": st.status,
        "by": st.by,
        "person": st.person,
        "reason": st.reason,
        "expires_ms": st.expires_ms,
    }
