"""Sending typed messages onto the mesh, with every header the protocol asks for.

`MeshClient` is what the CLI, external Python programs and the handler `Context` use to
publish. It stamps ids, conversation, causation, hop count, deadline, sender and the
current trace context on each message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh import envelope as h
from mesh.codec import JSON, Codec, default_codec
from mesh.messages import Message, type_of
from mesh.settings import Settings
from mesh.subjects import Address, conversation_id
from mesh.transport import NatsTransport, Transport

_propagator = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class Sent:
    """What was published: its id, conversation and subject."""

    id: str
    conversation: str
    subject: str


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a new message comes from: the message being handled, if any."""

    conversation: str | None = None
    causation: str = ""
    hop: int = 0
    deadline_ms: int | None = None
    reply_to: str = ""


ROOT = Lineage()


class MeshClient:
    """Publishes typed messages as `sender`."""

    def __init__(self, transport: Transport, sender: str, codec: Codec = default_codec) -> None:
        self.transport = transport
        self.sender = sender
        self.codec = codec

    @classmethod
    async def connect(cls, settings: Settings, sender: str, *, url: str | None = None) -> MeshClient:
        return cls(await NatsTransport.connect(settings, sender, url=url), sender)

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(
        self,
        msg: Message,
        *,
        lineage: Lineage = ROOT,
        conversation: str | None = None,
        content_type: str = JSON,
        reply_to: str = "",
        deadline: float | None = None,
    ) -> Sent:
        """Publish `msg` as an event of its type: every agent handling the type gets it.

        `deadline` (seconds from now) travels downstream; work past it is dead-lettered.
        """
        conv = _conversation(conversation or lineage.conversation)
        lineage = _with_deadline(lineage, deadline)
        return await self.emit(
            Address.event(conv, type_of(type(msg)).name), msg, lineage, content_type, reply_to
        )

    async def send(
        self,
        agent: str,
        msg: Message,
        *,
        lineage: Lineage = ROOT,
        conversation: str | None = None,
        content_type: str = JSON,
        reply_to: str = "",
        deadline: float | None = None,
    ) -> Sent:
        """Send `msg` to one agent's inbox (one replica of it handles it)."""
        conv = _conversation(conversation or lineage.conversation)
        lineage = _with_deadline(lineage, deadline)
        return await self.emit(Address.inbox(conv, agent), msg, lineage, content_type, reply_to)

    async def emit(
        self,
        address: Address,
        msg: Message,
        lineage: Lineage = ROOT,
        content_type: str = JSON,
        reply_to: str = "",
        subject: str | None = None,
    ) -> Sent:
        """Publish to an address (or a raw reply `subject`), with full headers."""
        mtype = type_of(type(msg))
        data = self.codec.encode(msg, content_type)
        headers = self.headers(mtype.name, mtype.version, address.conversation, lineage, content_type)
        if reply_to or lineage.reply_to:
            headers[h.REPLY_TO] = reply_to or lineage.reply_to
        target = subject or address.subject
        await self.transport.publish(target, data, headers)
        return Sent(id=headers[h.ID], conversation=address.conversation, subject=target)

    def headers(
        self,
        type_name: str,
        version: int,
        conversation: str,
        lineage: Lineage = ROOT,
        content_type: str = JSON,
    ) -> dict[str, str]:
        msg_id = h.new_id()
        headers = {
            h.TYPE: type_name,
            h.VERSION: str(version),
            h.ID: msg_id,
            h.NATS_MSG_ID: msg_id,
            h.CONVERSATION: conversation,
            h.SENDER: self.sender,
            h.SENT_AT: str(h.now_ns()),
            h.HOP: str(lineage.hop),
        }
        if lineage.causation:
            headers[h.CAUSATION] = lineage.causation
        if lineage.deadline_ms is not None:
            headers[h.DEADLINE] = str(lineage.deadline_ms)
        if content_type != JSON:
            headers[h.CONTENT_TYPE] = content_type
        _propagator.inject(headers)
        return headers


def _with_deadline(lineage: Lineage, seconds: float | None) -> Lineage:
    if seconds is None:
        return lineage
    return replace(lineage, deadline_ms=int(time.time() * 1000 + seconds * 1000))


def _conversation(value: str | None) -> str:
    return conversation_id(value) if value else h.new_id()
