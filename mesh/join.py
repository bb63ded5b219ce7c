"""Fan-out and fan-in: parallel and hierarchical handoffs whose state lives in NATS KV.

    from mesh.join import Gathered, majority, quorum

    findings = agent.join("findings", Findings, policy=quorum(2), resolve=majority(key))

    @agent.handler
    async def on_question(q: Question, ctx: mesh.Context) -> None:
        await ctx.fan_out(findings, [("research", Ask(...)), ("archive", Ask(...))], deadline=30)

    @findings.complete
    async def answer(g: Gathered[Findings], ctx: mesh.Context) -> Answer:
        return Answer(text=g.resolved.text if g.resolved else "no agreement")

This module declares joins; `mesh.patterns.fanin` runs them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from mesh.wire import subjects
from mesh.wire.errors import RegistrationError
from mesh.wire.messages import Message, message, type_of

T = TypeVar("T", bound=Message)


@message("mesh.join_timer")
class JoinTimer(Message, frozen=True):
    """The deadline of a join, sent by an agent to its own inbox when it fans out."""

    join: str
    due_ms: int


@message("mesh.join_handed_on")
class HandedOn(Message, frozen=True):
    """Sent to a join's agent by whoever holds one of its branches when it hands that branch
    on (`ctx.handoff`, or a reply along a route): `to` answers it from now on. On a mesh
    with signed envelopes the join takes a branch's answer only from its holder, so without
    this a task handed on could not be answered."""

    to: str


@message("mesh.judge_request")
class JudgeRequest(Message, frozen=True):
    """Sent to a judge agent when a join's answers must be decided between."""

    join: str
    candidates: list[str]  # each answer as JSON text
    agents: list[str]  # who gave each answer


@message("mesh.judge_verdict")
class JudgeVerdict(Message, frozen=True):
    """A judge agent's answer: the index of the chosen candidate and why."""

    choice: int
    reason: str = ""


# ---------------------------------------------------------------- declaration


@dataclass(frozen=True, slots=True)
class Policy:
    """When a join completes: ``all``, a ``quorum`` of n answers, or the ``first`` k."""

    kind: Literal["all", "quorum", "first"]
    n: int = 0

    def needed(self, branches: int) -> int:
        if self.kind == "all":
            return branches
        if self.kind == "quorum":
            return min(branches, self.n or branches // 2 + 1)
        return min(branches, max(1, self.n))


def all_of() -> Policy:
    return Policy("all")


def quorum(n: int = 0) -> Policy:
    """n answers (default: a majority of the branches)."""
    return Policy("quorum", n)


def first(k: int = 1) -> Policy:
    return Policy("first", k)


@dataclass(frozen=True, slots=True)
class Majority:
    """Pick the answer whose ``key`` most answers share (ties: the earliest)."""

    key: Callable[[Any], Hashable]


@dataclass(frozen=True, slots=True)
class Merge:
    """Combine every answer into one with ``fn(list_of_answers)``."""

    fn: Callable[[list[Any]], Any]


@dataclass(frozen=True, slots=True)
class JudgeBy:
    """Ask the judge agent to pick an answer (it handles `JudgeRequest`, returns `JudgeVerdict`)."""

    agent: str


Resolver = Majority | Merge | JudgeBy


def majority(key: Callable[[Any], Hashable] = lambda m: m) -> Majority:
    return Majority(key)


def merge(fn: Callable[[list[Any]], Any]) -> Merge:
    return Merge(fn)


def judge(agent: str) -> JudgeBy:
    return JudgeBy(subjects.agent_name(agent))


@dataclass(frozen=True, slots=True)
class Part(Generic[T]):
    """One gathered answer."""

    branch: str
    agent: str  # who the task went to
    sender: str  # who answered (another agent if the task was handed on)
    message: T
    message_id: str


@dataclass(frozen=True, slots=True)
class Gathered(Generic[T]):
    """What a completion handler receives: the answers, what is missing, and the resolution."""

    join_id: str
    parts: list[Part[T]]
    branches: dict[str, str]  # branch -> the agent it was sent to
    timed_out: bool = False
    resolved: T | None = None
    verdict: str = ""  # the judge's reason, if a judge decided
    late: list[str] = field(default_factory=list)

    @property
    def results(self) -> list[T]:
        return [p.message for p in self.parts]

    @property
    def missing(self) -> list[str]:
        """Agents whose branch did not answer."""
        got = {p.branch for p in self.parts}
        return [a for b, a in self.branches.items() if b not in got]

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def partial(self) -> bool:
        """Some branches did not answer (the deadline passed or a first-k policy fired)."""
        return bool(self.missing)


Completion = Callable[..., Awaitable[Any]]


class Join(Generic[T]):
    """A declared fan-in point of an agent. Create it with `Agent.join`."""

    def __init__(
        self,
        agent: str,
        name: str,
        types: tuple[type[T], ...],
        policy: Policy,
        resolve: Resolver | None,
    ) -> None:
        self.agent = agent
        self.name = name
        self.types = {type_of(t).name: t for t in types}
        self.policy = policy
        self.resolve = resolve
        self.handler: Completion | None = None
        self.takes_context = True

    def complete(self, fn: Completion) -> Completion:
        """Register the completion handler: ``async def f(g: Gathered[T], ctx) -> Message | None``."""
        import inspect

        if not inspect.iscoroutinefunction(fn):
            raise RegistrationError(f"join {self.name!r}: the completion handler must be `async def`")
        self.takes_context = len(inspect.signature(fn).parameters) >= 2
        self.handler = fn
        return fn

    def __repr__(self) -> str:
        return f"Join({self.agent}.{self.name}, {self.policy.kind})"
