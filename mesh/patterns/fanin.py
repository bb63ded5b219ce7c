"""Running joins: the state of each fan-out in a KV entry, answers recorded with
compare-and-set, and the completion fired exactly by the message that meets the policy.

`fan_out` stores the join's state, sends the tasks and returns: nothing waits in memory.
Each answer is recorded in the state with compare-and-set; the answer (or the deadline
timer) that meets the policy claims the completion in the same write, and the completion
handler runs while that message is being handled. If the process dies there, the message is
redelivered, to any replica, which sees that its own id claimed the completion and runs it
again (what it sends is deduplicated by derived ids).
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from mesh.join import (
    Gathered,
    HandedOn,
    Join,
    JoinTimer,
    JudgeBy,
    JudgeRequest,
    JudgeVerdict,
    Majority,
    Merge,
    Part,
)
from mesh.runtime import timers
from mesh.runtime.client import Answer, Lineage
from mesh.runtime.keepers import Outcome
from mesh.transport.delivery import Later
from mesh.transport.streams import join_key
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import default_codec
from mesh.wire.errors import DeliveryError, RegistrationError
from mesh.wire.messages import Message

if TYPE_CHECKING:
    from mesh.agent.context import Context
    from mesh.transport.state import StateStore


class PartRecord(msgspec.Struct):
    type: str
    data: str  # base64 body
    content_type: str
    message_id: str
    sender: str
    traceparent: str = ""


HAND_ON_WAIT = 1.0  # seconds an answer from another agent waits for its branch's hand-on


class JoinState(msgspec.Struct):
    name: str
    branches: dict[str, str]
    need: int
    deadline_ms: int | None
    conversation: str
    causation: str
    hop: int
    depth: int
    reply_to: str = ""
    reply_grant: str = ""
    reply_join: str = ""
    route: list[str] = []
    origin_deadline_ms: int | None = None
    parts: dict[str, PartRecord] = {}
    order: list[str] = []
    late: list[str] = []
    fired_by: str = ""
    timed_out: bool = False
    judging: bool = False
    verdict: int = -1
    verdict_reason: str = ""
    done: bool = False
    holders: dict[str, str] = {}  # branch -> the agent it was handed on to (mesh.join_handed_on)

    def answer(self) -> Answer:
        """Where the completion's result goes: what the fanned-out message asked for."""
        return Answer(
            reply_to=self.reply_to,
            reply_grant=self.reply_grant,
            join=self.reply_join,
            route=tuple(self.route),
            depth=self.depth,
            deadline_ms=self.origin_deadline_ms,
        )


_encode = msgspec.json.Encoder().encode
_decode_state = msgspec.json.Decoder(JoinState).decode


class JoinKeeper:
    """Runs the joins of one agent: starting them, recording answers, firing completions.
    A `Keeper` (mesh.runtime.keepers): it takes its timers and the answers to its fan-outs."""

    takes: tuple[type[Message], ...] = (JoinTimer,)
    answers = True

    def __init__(
        self,
        agent: str,
        joins: dict[str, Join[Any]],
        state: StateStore,
        max_depth: int,
        max_deliver: int = 5,
        *,
        authenticated: bool = False,
    ) -> None:
        self.agent = agent
        # senders are proven (signed envelopes): an answer must come from the agent its
        # branch was sent to, a timer from this agent
        self.authenticated = authenticated
        self.joins = joins
        self.state = state
        self.max_depth = max_depth
        self.max_deliver = max_deliver
        self.run_completion: Callable[[Join[Any], Gathered[Any], Context, JoinState], Awaitable[None]]

    def owns(self, env: h.Envelope) -> bool:
        return env.answer.startswith(self.agent + ".") or (
            env.address.kind == subjects.TIMER and env.type_name == "mesh.join_timer"
        )

    async def start(
        self, ctx: Context, join: Join[Any], tasks: list[tuple[str, Message]], deadline: float | None
    ) -> str:
        if join.agent != self.agent or self.joins.get(join.name) is not join:
            raise RegistrationError(f"join {join.name!r} is not declared on agent {self.agent!r}")
        if join.handler is None:
            raise RegistrationError(f"join {join.name!r} has no completion handler (@{join.name}.complete)")
        if not tasks:
            raise ValueError("fan_out needs at least one (agent, message) task")
        depth = ctx.depth + 1
        if depth > self.max_depth:
            raise DeliveryError(
                "depth_limit", f"delegation depth {depth} is past MESH_MAX_DEPTH={self.max_depth}"
            )
        jid = ctx.next_id()
        due = None if deadline is None else int(time.time() * 1000 + deadline * 1000)
        branches = {str(i): subjects.agent_name(agent) for i, (agent, _) in enumerate(tasks)}
        answer = ctx.answer
        state = JoinState(
            name=join.name,
            branches=branches,
            need=join.policy.needed(len(tasks)),
            deadline_ms=due,
            conversation=ctx.conversation_id,
            causation=ctx.message_id,
            hop=ctx.hop,
            depth=ctx.depth,
            reply_to=answer.reply_to,
            reply_grant=answer.reply_grant,
            reply_join=answer.join,
            route=list(answer.route),
            origin_deadline_ms=answer.deadline_ms,
        )
        key = join_key(self.agent, jid)
        await self.state.create(key, _encode(state))  # None: a re-run of this handler made it already
        mine = subjects.Address.inbox(ctx.conversation_id, self.agent).subject
        base = ctx.lineage
        for branch, (_, msg) in zip(branches, tasks, strict=True):
            lineage = Lineage(
                conversation=base.conversation,
                causation=base.causation,
                hop=base.hop,
                deadline_ms=due if due is not None else base.deadline_ms,
                reply_to=mine,
                join=f"{self.agent}.{jid}/{branch}",
                depth=depth,
            )
            address = subjects.Address.inbox(ctx.conversation_id, branches[branch])
            await ctx.emit(address, msg, lineage)
        if due is not None:
            timer = Lineage(
                conversation=base.conversation,
                causation=base.causation,
                hop=base.hop,
                answer=f"{self.agent}.{jid}/timer",
                depth=ctx.depth,
            )
            await ctx.emit(
                subjects.Address.timer(ctx.conversation_id, self.agent),
                JoinTimer(join=jid, due_ms=due),
                timer,
            )
        return jid

    async def receive(self, env: h.Envelope, ctx: Context) -> Outcome | Later:
        """Record an answer or a timer; run the completion if this message completes the join."""
        if env.type_name == "mesh.join_timer":
            timer = default_codec.decode(env.data, JoinTimer, env.content_type)
            jid, branch = timer.join, "timer"
            if not h.is_id_token(jid):  # a '*' or '>' in a key would be a KV wildcard
                raise DeliveryError("unknown_join", f"{h.show(jid)} is not a join id")
            if self.authenticated and env.sender != self.agent:
                raise DeliveryError(
                    "unauthorized", f"a join timer from {h.show(env.sender)}, not {self.agent!r}"
                )
            waiting = await timers.wait(env, ctx, timer, timer.due_ms, self.max_deliver)
            if waiting is not None:
                return "handled" if waiting == "rearmed" else waiting
        else:
            link = h.parse_link(env.answer)
            if link is None or link[0] != self.agent or link[2] == "timer":
                raise DeliveryError("unknown_join", f"{h.ANSWER} {h.show(env.answer)} names no join of ours")
            _, jid, branch = link
        key = join_key(self.agent, jid)
        while True:
            got = await self.state.get(key)
            if got is None:  # never started here, or its state expired (MESH_STATE keeps 7 days)
                raise DeliveryError("unknown_join", f"no join {jid!r} on agent {self.agent!r} (expired?)")
            raw, revision = got
            st = _decode_state(raw)
            join = self.joins.get(st.name)
            if join is None:
                raise DeliveryError("unknown_join", f"agent {self.agent!r} declares no join {st.name!r}")
            if env.type_name == "mesh.join_handed_on":
                handed = await self._hand_on(env, st, key, revision, jid, branch)
                if handed is None:
                    continue  # the state moved meanwhile: read it again
                return handed
            if self.authenticated and branch != "timer":
                wrong = self._check_sender(join, st, jid, branch, env.sender)
                if wrong is not None:
                    if ctx.attempt < self.max_deliver - 1:
                        return Later(HAND_ON_WAIT)  # the branch's hand-on may still be on its way
                    raise wrong
            if st.done:
                return "skipped"
            if st.fired_by:
                if st.fired_by == env.id:
                    break  # a redelivery of the message that fired it: run the completion again
                if branch == "judge" and st.judging:
                    verdict = default_codec.decode(env.data, JudgeVerdict, env.content_type)
                    st.verdict, st.verdict_reason = verdict.choice, verdict.reason
                    st.judging = False
                    st.fired_by = env.id
                elif branch != "timer" and env.id not in st.late and len(st.late) < 100:
                    st.late.append(env.id)  # after completion: noted, not gathered
                    await self.state.update(key, _encode(st), revision)
                    return "skipped"
                else:
                    return "skipped"
            elif branch == "timer":
                st.timed_out = True
                st.fired_by = env.id
            else:
                if branch not in st.branches:
                    raise DeliveryError("unknown_join", f"join {jid!r} has no branch {branch!r}")
                if env.type_name not in join.types:
                    raise DeliveryError(
                        "unknown_type",
                        f"join {st.name!r} gathers {', '.join(join.types)}, not {env.type_name}",
                    )
                if branch not in st.parts:
                    st.parts[branch] = PartRecord(
                        type=env.type_name,
                        data=base64.b64encode(env.data).decode(),
                        content_type=env.content_type,
                        message_id=env.id,
                        sender=env.sender,
                        traceparent=env.headers.get(h.TRACEPARENT, ""),
                    )
                    st.order.append(branch)
                if len(st.parts) >= st.need:
                    st.fired_by = env.id
            if st.fired_by == env.id and isinstance(join.resolve, JudgeBy) and st.verdict < 0:
                st.judging = True
            if await self.state.update(key, _encode(st), revision) is not None:
                if st.fired_by != env.id:
                    return "handled"  # recorded; not complete yet
                break
            # someone else changed it meanwhile: read again and retry
        if st.judging:
            await self._ask_judge(join, st, jid, ctx)
            return "handled"
        gathered = self._gathered(join, st, jid)
        await self.run_completion(join, gathered, ctx, st)
        # the completion's sends must be stored before the join is marked done: a redelivery
        # of this message after a crash finds a done join and would not send them again
        await ctx.flush()
        await self._finish(key)
        return "handled"

    def _check_sender(
        self, join: Join[Any], st: JoinState, jid: str, branch: str, sender: str
    ) -> DeliveryError | None:
        """Only the agent holding a branch answers it: the one it was sent to, or the one it
        was handed on to (the judge's branch: the judge). The refusal, if not."""
        if branch == "judge":
            expected = join.resolve.agent if isinstance(join.resolve, JudgeBy) else None
        else:
            expected = st.holders.get(branch) or st.branches.get(branch)
        if expected is not None and sender != expected:
            return DeliveryError(
                "unauthorized",
                f"{h.show(sender)} answered branch {branch!r} of join {jid!r}, held by {expected!r}",
            )
        return None

    async def _hand_on(
        self, env: h.Envelope, st: JoinState, key: str, revision: int, jid: str, branch: str
    ) -> Outcome | None:
        """Record who holds a branch now; None if the state moved under this update. Only its
        holder may hand it on (when senders are proven); a hand-on after the branch was
        answered or the join done changes nothing."""
        handed = default_codec.decode(env.data, HandedOn, env.content_type)
        if branch not in st.branches:
            raise DeliveryError("unknown_join", f"join {jid!r} has no branch {branch!r}")
        holder = st.holders.get(branch) or st.branches[branch]
        if self.authenticated and env.sender != holder:
            raise DeliveryError(
                "unauthorized",
                f"{h.show(env.sender)} handed on branch {branch!r} of join {jid!r}, held by {holder!r}",
            )
        if not subjects.is_agent_name(handed.to):
            raise DeliveryError("invalid", f"{h.show(handed.to)} is not an agent name")
        if st.done or branch in st.parts or st.holders.get(branch) == handed.to:
            return "skipped"
        st.holders[branch] = handed.to
        if await self.state.update(key, _encode(st), revision) is None:
            return None
        return "handled"

    async def _finish(self, key: str) -> None:
        while True:
            got = await self.state.get(key)
            if got is None:
                return
            st = _decode_state(got[0])
            st.done = True
            if await self.state.update(key, _encode(st), got[1]) is not None:
                return

    async def _ask_judge(self, join: Join[Any], st: JoinState, jid: str, ctx: Context) -> None:
        assert isinstance(join.resolve, JudgeBy)
        order = [b for b in st.order if b in st.parts]
        request = JudgeRequest(
            join=f"{join.name}/{jid}",
            candidates=[base64.b64decode(st.parts[b].data).decode("utf-8", "replace") for b in order],
            agents=[st.parts[b].sender for b in order],
        )
        lineage = Lineage(
            conversation=st.conversation,
            causation=ctx.message_id,
            hop=ctx.hop + 1,
            reply_to=subjects.Address.inbox(st.conversation, self.agent).subject,
            join=f"{self.agent}.{jid}/judge",
            depth=st.depth + 1,
        )
        address = subjects.Address.inbox(st.conversation, join.resolve.agent)
        await ctx.emit(address, request, lineage)

    def _gathered(self, join: Join[Any], st: JoinState, jid: str) -> Gathered[Any]:
        parts = []
        for b in st.order:
            rec = st.parts[b]
            cls = join.types[rec.type]
            msg = default_codec.decode(base64.b64decode(rec.data), cls, rec.content_type)
            parts.append(Part(b, st.branches[b], rec.sender, msg, rec.message_id))
        resolved: Any = None
        results = [p.message for p in parts]
        if results:
            if isinstance(join.resolve, Majority):
                keys = [join.resolve.key(m) for m in results]
                top = Counter(keys).most_common(1)[0][1]
                resolved = next(m for m, k in zip(results, keys, strict=True) if keys.count(k) == top)
            elif isinstance(join.resolve, Merge):
                resolved = join.resolve.fn(results)
            elif isinstance(join.resolve, JudgeBy) and 0 <= st.verdict < len(results):
                resolved = results[st.verdict]
            elif join.resolve is None:
                resolved = results[0]
        return Gathered(
            join_id=jid,
            parts=parts,
            branches=dict(st.branches),
            timed_out=st.timed_out,
            resolved=resolved,
            verdict=st.verdict_reason,
            late=list(st.late),
        )
