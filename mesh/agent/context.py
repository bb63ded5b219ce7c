"""The handler context: who this message came from, and how to answer or pass work on."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from msgspec.structs import replace

from mesh.join import HandedOn
from mesh.llm.metering import Totals
from mesh.llm.tools import Toolbox
from mesh.observability.tracing import current_trace_id
from mesh.runtime.client import Answer, Lineage, MeshClient, Sent
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import JSON
from mesh.wire.envelope import Envelope, derive_id
from mesh.wire.messages import Message, type_of
from mesh.wire.senders import sender_of
from mesh.wire.signature import REPLY_GRANT
from mesh.wire.subjects import Address

if TYPE_CHECKING:
    from mesh.join import Join
    from mesh.llm import LLM
    from mesh.memory.client import Memory
    from mesh.patterns.approval import ApprovalKeeper
    from mesh.patterns.fanin import JoinKeeper
    from mesh.patterns.toolloop import ToolRun
    from mesh.runtime.audit import AuditLog
    from mesh.transport.base import Transport
    from mesh.transport.outbox import Outbox
    from mesh.wire.settings import Settings

R = TypeVar("R", bound=Message)


class Context:
    """Handed to a handler with each message. Everything it sends carries the lineage
    (conversation, causation, hop + 1, deadline) and the handler's trace context.

    Messages sent while handling one message get ids derived from it, so when a message is
    delivered again after a crash, what the handler sends again is dropped as a duplicate.
    """

    __slots__ = (
        "_answer",
        "_client",
        "_joins",
        "_lineage",
        "_outbox",
        "_sent",
        "agent",
        "approvals",
        "attempt",
        "audit",
        "envelope",
        "gathered",
        "instance",
        "join_name",
        "llm",
        "log",
        "permissions",
        "settings",
        "tools",
        "usage",
    )

    def __init__(
        self,
        envelope: Envelope,
        client: MeshClient,
        agent: str,
        instance: str,
        llm: LLM,
        log: Any,
        *,
        joins: JoinKeeper | None = None,
        answer: Answer | None = None,
        attempt: int = 1,
        settings: Settings | None = None,
        tools: Toolbox | None = None,
        permissions: frozenset[str] = frozenset(),
        approvals: ApprovalKeeper | None = None,
        outbox: Outbox | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.envelope = envelope
        self.audit = audit  # this process's audit chain (mesh.runtime.audit), when run by the runtime
        self.tools = tools if tools is not None else Toolbox()  # what this agent's model may call
        self.permissions = permissions
        self.approvals = approvals
        self.attempt = attempt  # 1 on the first delivery; more when a stored message is retried
        self.settings = settings  # the process's settings, when run by the mesh runtime
        self.agent = agent
        self.instance = instance
        self.llm = llm
        self.log = log
        self.usage = Totals()  # the model calls of this handling: tokens and cost (its record entry)
        self.join_name = ""  # set when this context completes a join
        self.gathered: tuple[str, ...] = ()  # traceparents of what a join gathered
        self._client = client
        self._joins = joins
        self._outbox = outbox  # the runtime's: stored sends acknowledged together (flush)
        self._answer = answer or Answer(
            reply_to=envelope.reply_to,
            join=envelope.join,
            route=envelope.route,
            depth=envelope.depth,
            deadline_ms=envelope.deadline_ms,
            reply_grant=envelope.headers.get(REPLY_GRANT, "") if envelope.reply_to else "",
        )
        self._lineage = Lineage(
            conversation=envelope.conversation,
            causation=envelope.id,
            hop=envelope.hop + 1,
            deadline_ms=self._answer.deadline_ms,
            depth=self._answer.depth,
        )
        self._sent = 0

    @property
    def conversation_id(self) -> str:
        return self.envelope.conversation

    @property
    def message_id(self) -> str:
        return self.envelope.id

    @property
    def idempotency_key(self) -> str:
        """The same on every delivery of this message to this agent: hand it to external
        systems (payment APIs, databases) so a retried handler does not act twice."""
        return f"{self.agent}:{self.envelope.id}"

    @property
    def sender(self) -> str:
        """Who sent the message being handled (`mesh.wire.senders.sender_of`)."""
        return sender_of(self.envelope)

    @property
    def hop(self) -> int:
        return self.envelope.hop

    @property
    def depth(self) -> int:
        return self._answer.depth

    @property
    def deadline_ms(self) -> int | None:
        return self._answer.deadline_ms

    @property
    def trace_id(self) -> str:
        return current_trace_id()

    @property
    def lineage(self) -> Lineage:
        """The lineage of what this handler sends: conversation, causation, hop, deadline."""
        return self._lineage

    @property
    def answer(self) -> Answer:
        """Where the answer to the work in hand goes."""
        return self._answer

    @property
    def transport(self) -> Transport:
        return self._client.transport

    @property
    def outbox(self) -> Outbox | None:
        """Where this handler's stored sends wait for their acknowledgements (None: each
        send waits for its own)."""
        return self._outbox

    async def flush(self) -> None:
        """Wait until everything this handler has sent so far is stored. The runtime does
        this when the handler returns, before it acknowledges the message; call it where
        the handler must know earlier (before an external effect that relies on it)."""
        if self._outbox is not None:
            await self._outbox.flush()

    async def emit(
        self,
        address: Address,
        msg: Message,
        lineage: Lineage | None = None,
        content_type: str = JSON,
        *,
        msg_id: str | None = None,
    ) -> Sent:
        """Send `msg` to `address` with `lineage` (this handler's, if None): the building
        block of patterns on top of the mesh (joins, approvals). The message gets the next
        derived id unless `msg_id` is given. Its hop and depth are never below those of the
        message in hand (`floor`), whatever `lineage` says."""
        return await self._client.emit(
            address,
            msg,
            self.floor(lineage or self._lineage),
            content_type,
            msg_id=msg_id or self.next_id(),
            outbox=self._outbox,
        )

    def floor(self, lineage: Lineage) -> Lineage:
        """`lineage` with its hop and depth raised to at least what this handler received:
        they count how far work has travelled and how deeply it was delegated, and limit
        both (MESH_MAX_HOPS, MESH_MAX_DEPTH), so nothing an agent sends may count them back."""
        hop, depth = self.envelope.hop, self._answer.depth
        if lineage.hop >= hop and lineage.depth >= depth:
            return lineage
        return replace(lineage, hop=max(lineage.hop, hop), depth=max(lineage.depth, depth))

    def next_id(self) -> str:
        """The id of the next message this handler sends (stable across redeliveries)."""
        self._sent += 1
        return derive_id(self.envelope.id, self.agent, self._sent)

    async def send(self, agent: str, msg: Message, *, durable: bool = True, content_type: str = JSON) -> Sent:
        """Send to another agent; its reply comes back to this agent's inbox."""
        mine = Address.inbox(self.conversation_id, self.agent).subject
        lineage = replace(self._lineage, reply_to=mine)  # with no grant passed on: this agent's own
        return await self._emit(_address(self.conversation_id, agent, durable), msg, lineage, content_type)

    async def handoff(
        self,
        agent: str,
        msg: Message,
        *,
        route: Sequence[str] = (),
        durable: bool = True,
        content_type: str = JSON,
    ) -> Sent:
        """Pass the work on: the next agent answers whoever this message asked to be answered.

        ``route`` puts more agents in front of the rest of the current route.
        """
        lineage = self._onward(tuple(subjects.agent_name(a) for a in route) + self._answer.route)
        await self._hand_on(agent)
        return await self._emit(_address(self.conversation_id, agent, durable), msg, lineage, content_type)

    async def publish(self, msg: Message, *, content_type: str = JSON) -> Sent:
        """Publish an event of the message's type in this conversation."""
        address = Address.event(self.conversation_id, type_of(type(msg)).name)
        return await self._emit(address, msg, self._lineage, content_type)

    async def reply(self, msg: Message, *, content_type: str = JSON) -> Sent:
        """Answer the work in hand: to the next agent on its route, else to its reply target,
        else as an event. (A handler's return value is sent with this.)"""
        answer = self._answer
        if answer.route:
            nxt, rest = answer.route[0], answer.route[1:]
            await self._hand_on(nxt)
            return await self._emit(
                Address.inbox(self.conversation_id, nxt), msg, self._onward(rest), content_type
            )
        if not answer.reply_to:
            return await self.publish(msg, content_type=content_type)
        address = Address.event(self.conversation_id, type_of(type(msg)).name)
        # an answer owes nothing further: no reply target, no join obligation
        lineage = replace(self._onward(()), reply_to="", join="", answer=answer.join)
        return await self._client.emit(
            address,
            msg,
            self.floor(lineage),
            content_type,
            subject=answer.reply_to,
            msg_id=self.next_id(),
            outbox=self._outbox,
        )

    async def request(
        self,
        agent: str,
        msg: Message,
        reply_type: type[R],
        *,
        timeout: float = 5.0,
        errors: tuple[type[Message], ...] = (),
    ) -> R:
        """Ask an agent over its direct line and wait for its typed answer (holds this
        handler while waiting: for long work, prefer `fan_out` or `send`). An answer of one
        of the `errors` types raises `RequestRefused`."""
        return await self._client.request(
            agent, msg, reply_type, timeout=timeout, lineage=self._lineage, errors=errors
        )

    async def stream(self, *, system: str, prompt: str, max_tokens: int = 512) -> str:
        """Like ``llm.complete``, but the answer is published while it is generated: ``llm.chunk``
        events in this conversation, then one ``llm.final`` with the whole text (mesh.llm.streaming)."""
        from mesh.llm.streaming import stream_text

        return await stream_text(self, system=system, prompt=prompt, max_tokens=max_tokens)

    async def run_tools(
        self,
        *,
        system: str,
        prompt: str,
        data: Mapping[str, str] | None = None,
        allow: Iterable[str] | None = None,
        stream: bool = False,
        max_turns: int = 8,
        max_tokens: int = 512,
    ) -> ToolRun:
        """Let the model call this agent's tools until it answers (mesh.patterns.toolloop). Untrusted
        text goes in ``data`` (delimited blocks); ``allow`` narrows the tools; ``stream``
        publishes the answer as it is generated. If a call needs approval the result is
        ``parked``: return from the handler, it resumes on the decision."""
        from mesh.patterns.toolloop import run_tools

        return await run_tools(
            self,
            system=system,
            prompt=prompt,
            data=data,
            allow=allow,
            stream=stream,
            max_turns=max_turns,
            max_tokens=max_tokens,
        )

    @property
    def memory(self) -> Memory:
        """The shared semantic memory, through the memory service (docs/memory.md)."""
        from mesh.memory.client import Memory

        return Memory(self, self.settings)

    async def fan_out(
        self,
        join: Join[Any],
        tasks: Iterable[tuple[str, Message]],
        *,
        deadline: float | None = None,
    ) -> str:
        """Send each ``(agent, message)`` task and gather the answers in `join`; returns the
        join id. This handler returns at once: when the join's policy is met (or its
        deadline passes) the join's completion handler runs, on whichever replica gets the
        last answer, and its result answers the message in hand."""
        if self._joins is None:
            raise RuntimeError("fan_out is only available inside a handler run by the mesh runtime")
        return await self._joins.start(self, join, list(tasks), deadline)

    delegate = fan_out  # a supervisor's word for the same thing

    async def _hand_on(self, agent: str) -> None:
        """If the work in hand is a branch of a fan-out, tell the join's agent that `agent`
        holds the branch now: where senders are proven, the join takes a branch's answer only
        from its holder. Sent before the work itself, from the same outbox, so it is stored
        first."""
        link = h.parse_link(self._answer.join)
        if link is None or agent == self.agent:
            return
        holder = link[0]
        lineage = replace(self._lineage, reply_to="", join="", route=(), answer=self._answer.join)
        await self._emit(
            Address.inbox(self.conversation_id, holder),
            HandedOn(to=subjects.agent_name(agent)),
            lineage,
            JSON,
        )

    def _onward(self, route: tuple[str, ...]) -> Lineage:
        """Lineage for a message that carries the answer obligation on."""
        answer = self._answer
        to, grant = answer.reply_to, answer.reply_grant
        return replace(self._lineage, reply_to=to, reply_grant=grant, join=answer.join, route=route)

    def completing(self, join_name: str, ids: tuple[str, ...], traceparents: tuple[str, ...]) -> None:
        """Mark this context as the completion of a join that gathered `ids`."""
        self.join_name = join_name
        self.gathered = traceparents
        self._lineage = replace(self._lineage, gathers=ids)

    async def _emit(self, address: Address, msg: Message, lineage: Lineage, content_type: str) -> Sent:
        return await self._client.emit(
            address, msg, self.floor(lineage), content_type, msg_id=self.next_id(), outbox=self._outbox
        )


def _address(conversation: str, agent: str, durable: bool) -> Address:
    name = subjects.agent_name(agent)
    return Address.inbox(conversation, name) if durable else Address.direct(conversation, name)
