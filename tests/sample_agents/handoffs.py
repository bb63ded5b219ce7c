"""Agents for the handoff tests: a pipeline (stage_a -> stage_b -> stage_c), a coordinator
that fans work out to workers, a supervisor that delegates to leads who delegate further,
and a judge. Run in-process or as real processes (`mesh run sample_agents.handoffs:...`).

Side effects go to an external "ledger" (a KV bucket standing in for a payment API): each
is applied with the handler's idempotency key, so a retried handler cannot apply it twice.
HANDOFF_CRASH_EVERY=n makes a process kill itself (SIGKILL) in about one handler in n, on
the message's first delivery, after its effect and before its answer and acknowledgement:
the worst moment for exactly-once. HANDOFF_CRASH_COMPLETION=1 does the same in every join
completion's first attempt. On a server that requires authentication the ledger, being
outside the mesh, connects with credentials of its own: HANDOFF_LEDGER_CREDS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import zlib
from pathlib import Path

import nats
from nats.js.errors import KeyWrongLastSequenceError

from mesh import Agent, Context, Message, message
from mesh.join import Gathered, JudgeRequest, JudgeVerdict, first, judge, majority, quorum
from mesh.transport.auth import connect_options

LEDGER = "TEST_LEDGER"


@message("test.chain", version=1)
class Chain(Message):
    conversation: str
    marks: list[str] = []
    work_ms: int = 0


@message("test.chain_done", version=1)
class ChainDone(Message):
    conversation: str
    marks: list[str]


@message("test.task", version=1)
class Task(Message):
    text: str
    workers: int = 3
    work_ms: int = 0
    policy: str = "all"
    deadline: float | None = None


@message("test.work", version=1)
class Work(Message):
    text: str
    n: int
    work_ms: int = 0


@message("test.work_done", version=1)
class WorkDone(Message):
    text: str
    n: int
    answer: str
    by: int


@message("test.summary", version=1)
class Summary(Message):
    text: str
    answers: list[str]
    missing: list[str]
    timed_out: bool
    resolved: str = ""
    verdict: str = ""


# ------------------------------------------------------------------ the ledger

_ledger: object = None
_ledger_nc: object = None


async def apply_effect(ctx: Context, what: str) -> bool:
    """Apply an external effect once per idempotency key; True if this call applied it."""
    global _ledger, _ledger_nc
    if _ledger is None:
        servers = os.environ.get("MESH_NATS_URL", "").split(",")  # one URL, or a cluster's
        creds = os.environ.get("HANDOFF_LEDGER_CREDS")
        nc = _ledger_nc = await nats.connect(
            servers,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=_ledger_error,
            **(connect_options(Path(creds)) if creds else _ledger_account()),
        )
        js = nc.jetstream()
        try:
            _ledger = await js.key_value(LEDGER)
        except Exception:
            from nats.js.api import KeyValueConfig

            replicas = int(os.environ.get("MESH_REPLICAS", "1"))
            _ledger = await js.create_key_value(KeyValueConfig(bucket=LEDGER, replicas=replicas))
    key = ctx.idempotency_key.replace(":", ".")
    try:
        await _ledger.create(key, f"{what} {ctx.conversation_id}".encode())  # type: ignore[attr-defined]
        return True
    except KeyWrongLastSequenceError:
        return False


def _ledger_account() -> dict[str, object]:
    """The ledger stands for an outside system with an account of its own: on a mesh with
    authentication, the operator's, found as `mesh` commands find it (MESH_DATA_DIR)."""
    from mesh.transport.identities import with_role
    from mesh.wire.settings import Settings

    creds = with_role(Settings.load(), "operator").nats_creds
    return connect_options(creds) if creds is not None else {}


async def _ledger_error(exc: Exception) -> None:
    """Connection errors while a server is down: the ledger reconnects, no traceback."""


async def close_ledger() -> None:
    global _ledger, _ledger_nc
    if _ledger_nc is not None:
        await _ledger_nc.close()  # type: ignore[attr-defined]
    _ledger = _ledger_nc = None


def _maybe_crash(ctx: Context, salt: str, always: bool = False) -> None:
    """Die here on a first delivery, if HANDOFF_CRASH_* says so (see the module docstring);
    HANDOFF_CRASH_ALWAYS=1: on every delivery."""
    if os.environ.get("HANDOFF_CRASH_ALWAYS") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    if ctx.attempt > 1:
        return
    every = int(os.environ.get("HANDOFF_CRASH_EVERY", "0"))
    if (always and os.environ.get("HANDOFF_CRASH_COMPLETION") == "1") or (
        every and zlib.crc32(f"{salt}/{ctx.message_id}".encode()) % every == 0
    ):
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ sequential


def _stage(name: str) -> Agent:
    agent = Agent(name, description=f"pipeline {name}")

    @agent.handler(events=False)
    async def on_chain(chain: Chain, ctx: Context) -> Chain | ChainDone:
        if chain.work_ms:
            await asyncio.sleep(chain.work_ms / 1000)
        await apply_effect(ctx, name)
        _maybe_crash(ctx, name)
        marks = [*chain.marks, name]
        if name == "stage_c":
            return ChainDone(conversation=chain.conversation, marks=marks)
        return Chain(conversation=chain.conversation, marks=marks, work_ms=chain.work_ms)

    return agent


stage_a = _stage("stage_a")
stage_b = _stage("stage_b")
stage_c = _stage("stage_c")


# ------------------------------------------------------------------ parallel

worker = Agent("worker", description="answers one piece of work")


@worker.handler
async def on_work(work: Work, ctx: Context) -> WorkDone:
    if work.work_ms:
        await asyncio.sleep(work.work_ms / 1000 * (1 + work.n))
    # workers disagree on purpose: the odd one out answers differently
    answer = f"{work.text}!" if work.n != 1 else f"{work.text}?"
    return WorkDone(text=work.text, n=work.n, answer=answer, by=os.getpid())


coordinator = Agent("coordinator", description="fans a task out and gathers the answers")
gather_all = coordinator.join("all", WorkDone, resolve=majority(lambda w: w.answer))
gather_quorum = coordinator.join("quorum", WorkDone, policy=quorum(2), resolve=majority(lambda w: w.answer))
gather_first = coordinator.join("first", WorkDone, policy=first(1))
gather_judged = coordinator.join("judged", WorkDone, resolve=judge("judge"))
JOINS = {"all": gather_all, "quorum": gather_quorum, "first": gather_first, "judged": gather_judged}


@coordinator.handler
async def on_task(task: Task, ctx: Context) -> None:
    work = [("worker", Work(text=task.text, n=i, work_ms=task.work_ms)) for i in range(task.workers)]
    await ctx.fan_out(JOINS[task.policy], work, deadline=task.deadline)


async def _summarize(g: Gathered[WorkDone], ctx: Context) -> Summary:
    await apply_effect(ctx, "coordinator")
    _maybe_crash(ctx, "coordinator", always=True)
    return Summary(
        text=g.results[0].text if g.results else "",
        answers=sorted(w.answer for w in g.results),
        missing=g.missing,
        timed_out=g.timed_out,
        resolved=g.resolved.answer if g.resolved else "",
        verdict=g.verdict,
    )


for _join in JOINS.values():
    _join.complete(_summarize)


judge_agent = Agent("judge", description="picks the shortest answer")


@judge_agent.handler
async def on_judge(req: JudgeRequest) -> JudgeVerdict:
    import json

    answers = [json.loads(c)["answer"] for c in req.candidates]
    best = min(range(len(answers)), key=lambda i: (answers[i].endswith("?"), i))
    return JudgeVerdict(choice=best, reason=f"{answers[best]} is a statement, not a question")


# ------------------------------------------------------------------ hierarchical

supervisor = Agent("supervisor", description="splits a task between two leads")
leads_join = supervisor.join("leads", Summary)

lead = Agent("lead", description="splits its part between workers")
lead_join = lead.join("workers", WorkDone)


@supervisor.handler
async def on_big_task(task: Task, ctx: Context) -> None:
    parts = [("lead", Task(text=f"{task.text}/{i}", workers=2, work_ms=task.work_ms)) for i in range(2)]
    await ctx.delegate(leads_join, parts, deadline=task.deadline)


@leads_join.complete
async def synthesize(g: Gathered[Summary], ctx: Context) -> Summary:
    await apply_effect(ctx, "supervisor")
    _maybe_crash(ctx, "supervisor", always=True)
    answers = sorted(a for s in g.results for a in s.answers)
    return Summary(text="synthesis", answers=answers, missing=g.missing, timed_out=g.timed_out)


@lead.handler
async def on_part(task: Task, ctx: Context) -> None:
    work = [("worker", Work(text=task.text, n=i, work_ms=task.work_ms)) for i in range(task.workers)]
    await ctx.delegate(lead_join, work)


@lead_join.complete
async def lead_done(g: Gathered[WorkDone], ctx: Context) -> Summary:
    return Summary(
        text=g.results[0].text,
        answers=sorted(w.answer for w in g.results),
        missing=g.missing,
        timed_out=False,
    )


# ------------------------------------------------------------------ failure

fragile = Agent("fragile", description="fails on poison, forever")


@fragile.handler(events=False)
async def on_fragile(work: Work, ctx: Context) -> WorkDone:
    if work.text == "poison":
        raise RuntimeError(f"poisoned (attempt {ctx.attempt})")
    return WorkDone(text=work.text, n=work.n, answer="ok", by=os.getpid())
