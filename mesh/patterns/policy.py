"""Policies: the rules of ``MESH_POLICY_FILE`` (mesh.patterns.rules), run on everything an
agent's model proposes and everything the agent sends.

Three places, each the one place its kind of act goes through:

- every **tool call** the model makes, after the allow list and permissions, before the tool
  runs (`check_tool`, from the tool loop);
- every **outgoing message**, as a publish middleware after the agent's own and before the
  signature and the record (`Policy.outgoing`);
- every **model reply**, around the agent's journaled model (`Policy.govern`).

Rules are read top to bottom. A matching ``redact`` rule replaces what it names with
``[redacted]`` and the next rules see the result; the first matching ``allow``, ``deny`` or
``approve`` rule decides. No deciding rule: allowed. A condition that cannot be evaluated (a
missing field, a type mismatch) denies, naming the rule and the error: guard with ``has()``.
A report-only rule (or file, or ``MESH_POLICY_REPORT_ONLY``) is recorded and changes nothing.

What a denial does: a tool call is answered to the model as a tool error (``policy_denied``);
an outgoing message or a model reply raises `PolicyDenied`, so the handling fails and the
message is dead-lettered at once with the rule and its reason (a rule does not change its
mind on a retry, and the journal would hand the same reply back). ``approve`` parks the call
as ``approval=True`` does (mesh.patterns.approval).

Every match is recorded on the current span (an event ``mesh.policy``, and the attribute
``mesh.policy.rule``) and, within a handling, in the audit trail (kind ``policy``).
"""

from __future__ import annotations

import contextvars
import re
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cel
import msgspec
import structlog
from msgspec.structs import replace
from opentelemetry import trace

from mesh.llm.tools import ToolError, ToolNotAllowed
from mesh.llm.types import LLM, Base, Reply, Request, StreamEvent, Text, ToolCall
from mesh.middleware.publish import Outgoing, Send
from mesh.patterns import rules as rulebook
from mesh.patterns.rules import REDACTED, On, Rule, Rules
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import JSON, MSGPACK
from mesh.wire.errors import DeliveryError

if TYPE_CHECKING:
    from mesh.agent.context import Context
    from mesh.middleware.base import Call
    from mesh.wire.settings import Settings

log = structlog.get_logger("mesh.policy")
MAX_CONVERSATIONS = 10_000  # tool-call counters kept per process (least recently used dropped)


class PolicyDenied(DeliveryError):
    """A policy rule denied an outgoing message or a model reply: the handling is
    dead-lettered at once as ``policy_denied`` with the rule's name and reason."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__("policy_denied", f"policy rule {rule!r} denied it: {reason}")
        self.rule = rule


class PolicyRefused(ToolNotAllowed):
    """A policy rule denied a tool call; the model is told, as for a tool not allowed."""

    kind = "policy_denied"


def _find_all(text: object, pattern: object) -> list[str]:
    found = re.findall(str(pattern), str(text))
    return [m if isinstance(m, str) else m[0] for m in found]


FUNCTIONS: dict[str, Any] = {"find_all": _find_all, "lower": lambda text: str(text).lower()}


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the rules decided, the deciding rule (None: none matched) and the value checked,
    after any redaction."""

    decision: str
    rule: Rule | None
    value: Any
    reason: str = ""
    redacted: tuple[Rule, ...] = ()  # the redact rules applied on the way


@dataclass(slots=True)
class Handling:
    """The handling a check runs in: its context, and the body of the message in hand."""

    ctx: Context
    _received: dict[str, Any] | None = field(default=None)

    @property
    def received(self) -> dict[str, Any]:
        if self._received is None:
            env = self.ctx.envelope
            self._received = _body(env.data, env.content_type)
        return self._received


_current: contextvars.ContextVar[tuple[Policy, Handling] | None] = contextvars.ContextVar(
    "mesh_policy", default=None
)


class Policy:
    """One agent's rules in this process (empty: every check passes through at no cost)."""

    def __init__(self, rules: Rules, agent: str, tenant: str = "default") -> None:
        self.rules = rules
        self.agent = agent
        self.tenant = tenant
        self._calls: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def load(cls, settings: Settings, agent: str) -> Policy:
        """The rules of MESH_POLICY_FILE, checked now (`ConfigError` stops the start)."""
        if settings.policy_file is None:
            return cls(rulebook.Rules(), agent, settings.tenant)
        rules = rulebook.load(settings.policy_file, settings.policy_report_only)
        log.info("policy loaded", agent=agent, file=rules.source, rules=len(rules.rules))
        return cls(rules, agent, settings.tenant)

    # ------------------------------------------------------------ the three places

    def scope(self, call_next: Call) -> Call:
        """Handler middleware: the checks made while handling a message know its context."""
        if not self.rules.rules:
            return call_next

        async def call(ctx: Any, msg: Any) -> Any:
            token = _current.set((self, Handling(ctx)))
            try:
                return await call_next(ctx, msg)
            finally:
                _current.reset(token)

        return call

    def outgoing(self, call_next: Send) -> Send:
        """Publish middleware: the ``message`` rules, on every message the agent sends."""
        if not self.rules.of("message"):
            return call_next

        async def send(out: Outgoing) -> Any:
            content_type = out.headers.get(h.CONTENT_TYPE, JSON)
            body = _body(out.data, content_type)
            address = subjects.parse(out.subject)
            names = {
                "type": out.headers.get(h.TYPE, ""),
                "subject": out.subject,
                "kind": address.kind if address is not None else "reply",
                "target": address.target if address is not None else out.subject,
                "body": body,
            }
            verdict = await self.decide("message", names, "body", str(names["type"]))
            if verdict.decision == "deny":
                raise PolicyDenied(_name(verdict), verdict.reason)
            if verdict.redacted and verdict.value != body:
                out.data = _encode(verdict.value, content_type)
            return await call_next(out)

        return send

    def govern(self, model: LLM) -> LLM:
        """The agent's model with the ``output`` rules checked on every reply."""
        return Governed(model, self) if self.rules.of("output") else model

    # ------------------------------------------------------------ deciding

    async def check_tool(self, ctx: Context, call: ToolCall) -> tuple[ToolCall, ToolError | None, bool]:
        """The ``tool`` rules on one call: the call (its arguments redacted), the error that
        refuses it, and whether it needs a person's approval first."""
        conversation = ctx.conversation_id
        names = {"tool": call.name, "args": call.input, "calls": self._calls.get(conversation, 0)}
        verdict = await self.decide("tool", names, "args", call.name)
        if verdict.decision == "deny":
            return call, PolicyRefused(call.name, f"policy rule {_name(verdict)!r}: {verdict.reason}"), False
        self._calls[conversation] = self._calls.pop(conversation, 0) + 1
        while len(self._calls) > MAX_CONVERSATIONS:
            self._calls.popitem(last=False)
        if verdict.redacted and verdict.value != call.input:
            call = replace(call, input=verdict.value)
        return call, None, verdict.decision == "approve"

    async def check_output(self, reply: Reply) -> Reply:
        names = {
            "text": reply.text,
            "tool_calls": [{"name": c.name, "args": c.input} for c in reply.tool_calls],
            "model": reply.model,
            "provider": reply.provider,
        }
        verdict = await self.decide("output", names, "text", reply.model or "model")
        if verdict.decision == "deny":
            raise PolicyDenied(_name(verdict), verdict.reason)
        if not verdict.redacted:
            return reply
        patterns = [r.pattern for r in verdict.redacted if r.pattern is not None]
        content = [Text(_spans(b.text, patterns)) if isinstance(b, Text) else b for b in reply.content]
        return replace(reply, content=content)

    async def decide(self, on: On, names: dict[str, Any], payload: str, subject: str) -> Verdict:
        """Run the rules of `on` over `names` (with the handling's own added); `payload` is
        the name of the value a redaction changes."""
        found = _current.get()
        handling = found[1] if found is not None else None
        scope = {**self._common(handling), **names}
        redacted: list[Rule] = []
        for rule in self.rules.of(on):
            error = ""
            try:
                result = rule.when.execute(cel.Context(scope, FUNCTIONS))
                if not isinstance(result, bool):
                    error = f"the condition gave {result!r}, not true or false"
            except Exception as exc:
                result, error = True, f"{type(exc).__name__}: {exc}"
            if not result and not error:
                continue
            decision = "deny" if error else rule.decision
            reason = f"the condition could not be evaluated ({error})" if error else rule.reason or rule.name
            enforced = not (rule.report_only or self.rules.report_only)
            await self._record(handling, rule, on, decision, enforced, reason, subject)
            if not enforced:
                continue
            if decision == "redact":
                scope[payload] = _redact(scope[payload], rule)
                redacted.append(rule)
                continue
            return Verdict(decision, rule, scope[payload], reason, tuple(redacted))
        return Verdict("allow", None, scope[payload], "", tuple(redacted))

    def _common(self, handling: Handling | None) -> dict[str, Any]:
        if handling is None:
            return {
                "agent": self.agent,
                "sender": "",
                "conversation": "",
                "tenant": self.tenant,
                "received": {},
                "received_type": "",
            }
        ctx = handling.ctx
        return {
            "agent": self.agent,
            "sender": ctx.sender,
            "conversation": ctx.conversation_id,
            "tenant": self.tenant,
            "received": handling.received,
            "received_type": ctx.envelope.type_name,
        }

    async def _record(
        self,
        handling: Handling | None,
        rule: Rule,
        on: str,
        decision: str,
        enforced: bool,
        reason: str,
        subject: str,
    ) -> None:
        """The matched rule, on the current span and in the audit trail."""
        span = trace.get_current_span()
        span.add_event(
            "mesh.policy",
            {
                "mesh.policy.rule": rule.name,
                "mesh.policy.on": on,
                "mesh.policy.decision": decision,
                "mesh.policy.enforced": enforced,
                "mesh.policy.subject": subject,
                "mesh.policy.reason": reason,
            },
        )
        span.set_attribute("mesh.policy.rule", rule.name)
        log.info(
            "policy rule matched" if enforced else "policy rule matched (report only)",
            agent=self.agent,
            rule=rule.name,
            on=on,
            decision=decision,
            subject=subject,
        )
        ctx = handling.ctx if handling is not None else None
        if ctx is not None and ctx.audit is not None:
            await ctx.audit.append(
                "policy",
                actor=ctx.sender,
                trace_id=ctx.trace_id,
                conversation=ctx.conversation_id,
                detail={
                    "rule": rule.name,
                    "on": on,
                    "decision": decision,
                    "enforced": "yes" if enforced else "report-only",
                    "subject": subject,
                    "reason": reason[:512],
                    "where": rule.where,
                },
            )


class Governed(Base):
    """A model whose replies go through the ``output`` rules. Streamed, the deltas pass as
    they come (``message`` rules see their chunks); the rules see the whole reply at the end."""

    def __init__(self, inner: LLM, policy: Policy) -> None:
        self.inner = inner
        self.name = inner.name
        self.policy = policy
        self.metering = getattr(inner, "metering", None)

    async def chat(self, request: Request) -> Reply:
        return await self.policy.check_output(await self.inner.chat(request))

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        async for event in self.inner.stream(request):
            yield await self.policy.check_output(event) if isinstance(event, Reply) else event


async def check_tool(ctx: Context, call: ToolCall) -> tuple[ToolCall, ToolError | None, bool]:
    """The ``tool`` rules of the policy of the handling in hand (none outside one)."""
    found = _current.get()
    if found is None or not found[0].rules.of("tool"):
        return call, None, False
    return await found[0].check_tool(ctx, call)


def _name(verdict: Verdict) -> str:
    return verdict.rule.name if verdict.rule is not None else "?"


def _body(data: bytes, content_type: str) -> dict[str, Any]:
    try:
        value = msgspec.msgpack.decode(data) if content_type == MSGPACK else msgspec.json.decode(data)
    except msgspec.DecodeError:
        return {}
    return value if isinstance(value, dict) else {}  # a body that is no object has no fields


def _encode(value: Any, content_type: str) -> bytes:
    return msgspec.msgpack.encode(value) if content_type == MSGPACK else msgspec.json.encode(value)


def _redact(value: Any, rule: Rule) -> Any:
    """`value` with what `rule` names replaced by ``[redacted]``: each field path (all of it,
    or the pattern's matches in it), else the pattern's matches in every string."""
    if not rule.fields:
        return _everywhere(value, rule.pattern)
    for path in rule.fields:
        value = _at(value, path.split("."), rule.pattern)
    return value


def _at(value: Any, path: list[str], pattern: re.Pattern[str] | None) -> Any:
    if isinstance(value, list):
        return [_at(v, path, pattern) for v in value]
    if not path:
        return _everywhere(value, pattern) if pattern is not None else REDACTED
    if not isinstance(value, dict) or path[0] not in value:
        return value
    return {**value, path[0]: _at(value[path[0]], path[1:], pattern)}


def _everywhere(value: Any, pattern: re.Pattern[str] | None) -> Any:
    if isinstance(value, str):
        return pattern.sub(REDACTED, value) if pattern is not None else REDACTED
    if isinstance(value, dict):
        return {k: _everywhere(v, pattern) for k, v in value.items()}
    if isinstance(value, list):
        return [_everywhere(v, pattern) for v in value]
    return value


def _spans(text: str, patterns: list[re.Pattern[str]]) -> str:
    for pattern in patterns:
        text = pattern.sub(REDACTED, text)
    return text
