"""The handler context: who this message came from, and how to answer or pass work on."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh.client import Lineage, MeshClient, Sent
from mesh.codec import JSON
from mesh.envelope import Envelope
from mesh.messages import Message, type_of
from mesh.subjects import Address
from mesh.tracing import current_trace_id

if TYPE_CHECKING:
    from mesh.llm import LLM


class Context:
    """Handed to a handler with each message. Everything it sends carries the lineage
    (conversation, causation, hop + 1, deadline) and the handler's trace context."""

    __slots__ = ("_client", "_lineage", "agent", "envelope", "instance", "llm", "log")

    def __init__(
        self, envelope: Envelope, client: MeshClient, agent: str, instance: str, llm: LLM, log: Any
    ) -> None:
        self.envelope = envelope
        self.agent = agent
        self.instance = instance
        self.llm = llm
        self.log = log
        self._client = client
        self._lineage = Lineage(
            conversation=envelope.conversation,
            causation=envelope.id,
            hop=envelope.hop + 1,
            deadline_ms=envelope.deadline_ms,
        )

    @property
    def conversation_id(self) -> str:
        return self.envelope.conversation

    @property
    def message_id(self) -> str:
        return self.envelope.id

    @property
    def sender(self) -> str:
        return self.envelope.sender

    @property
    def hop(self) -> int:
        return self.envelope.hop

    @property
    def deadline_ms(self) -> int | None:
        return self.envelope.deadline_ms

    @property
    def trace_id(self) -> str:
        return current_trace_id()

    async def send(self, agent: str, msg: Message, *, content_type: str = JSON) -> Sent:
        """Send to another agent; its reply comes back to this agent's inbox."""
        mine = Address.inbox(self.conversation_id, self.agent).subject
        return await self._client.send(
            agent, msg, lineage=self._lineage, content_type=content_type, reply_to=mine
        )

    async def handoff(self, agent: str, msg: Message, *, content_type: str = JSON) -> Sent:
        """Pass the work on: the next agent answers whoever this message asked to be answered."""
        lineage = Lineage(
            conversation=self._lineage.conversation,
            causation=self._lineage.causation,
            hop=self._lineage.hop,
            deadline_ms=self._lineage.deadline_ms,
            reply_to=self.envelope.reply_to,
        )
        return await self._client.send(agent, msg, lineage=lineage, content_type=content_type)

    async def publish(self, msg: Message, *, content_type: str = JSON) -> Sent:
        """Publish an event of the message's type in this conversation."""
        return await self._client.publish(msg, lineage=self._lineage, content_type=content_type)

    async def reply(self, msg: Message, *, content_type: str = JSON) -> Sent:
        """Answer this message: to its reply subject if it has one, else as an event."""
        target = self.envelope.reply_to
        if not target:
            return await self.publish(msg, content_type=content_type)
        address = Address.event(self.conversation_id, type_of(type(msg)).name)
        return await self._client.emit(address, msg, self._lineage, content_type=content_type, subject=target)
