"""Sending typed messages onto the mesh, with every header the protocol asks for.

`MeshClient` is what the CLI, external Python programs and the handler `Context` use to
publish. It stamps ids, conversation, causation, hop count, deadline, sender and the
current trace context on each message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
from msgspec.structs import replace

from mesh.middleware.publish import PUBLISH, REQUEST, STORE, Outgoing, PublishMiddleware, chain_publish
from mesh.middleware.signing import signing
from mesh.observability.record import Recorder, recording
from mesh.observability.tracing import inject_trace
from mesh.runtime.deadletter import DeliveryFailed
from mesh.transport.base import Transport
from mesh.transport.keys import KeyDirectory, known_directory, signer_of
from mesh.transport.nats import NatsTransport
from mesh.transport.outbox import Outbox
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import JSON, Codec, default_codec
from mesh.wire.errors import DecodeError, RequestError, RequestFailed, RequestRefused
from mesh.wire.messages import Message, type_of
from mesh.wire.settings import Settings
from mesh.wire.signature import REPLY_GRANT, BadSignature, Signer
from mesh.wire.signature import verify as verify_signature
from mesh.wire.subjects import Address, conversation_id

R = TypeVar("R", bound=Message)


NO_RESPONDERS_WAIT = 1.0  # seconds a request asks again while nobody answers its subject
NO_RESPONDERS_PAUSE = 0.05


class Sent(msgspec.Struct, frozen=True):
    """What was published: its id, conversation and subject."""

    id: str
    conversation: str
    subject: str


class Lineage(msgspec.Struct, frozen=True):
    """Where a new message comes from: the message being handled, if any."""

    conversation: str | None = None
    causation: str = ""
    hop: int = 0
    deadline_ms: int | None = None
    reply_to: str = ""
    reply_grant: str = ""  # the reply target owner's Mesh-Reply-Grant, passed on with it
    join: str = ""  # the fan-out branch whose answer this work owes (Mesh-Join)
    answer: str = ""  # the fan-out branch this message answers (Mesh-Answer)
    route: tuple[str, ...] = ()  # agents still to visit after the receiver
    depth: int = 0
    gathers: tuple[str, ...] = ()  # a join's output: the ids of the answers it gathered


ROOT = Lineage()


class Answer(msgspec.Struct, frozen=True):
    """Where the answer to the work in hand goes: a reply target, the fan-out branch it
    belongs to, and the agents still on its route."""

    reply_to: str = ""
    join: str = ""
    route: tuple[str, ...] = ()
    depth: int = 0
    deadline_ms: int | None = None
    reply_grant: str = ""  # Mesh-Reply-Grant of whoever owns `reply_to`


class MeshClient:
    """Publishes typed messages as `sender`.

    Every message it sends goes through `publish_middleware` (mesh.middleware.publish) on
    its way to the transport; the default stamps the current trace context on it.
    """

    def __init__(
        self,
        transport: Transport,
        sender: str,
        codec: Codec = default_codec,
        *,
        publish_middleware: Sequence[PublishMiddleware] = (inject_trace,),
        signer: Signer | None = None,
    ) -> None:
        self.transport = transport
        self.sender = sender
        self.codec = codec
        # with an identity: it grants the answers to what it asks to come back to it
        self.signer = signer
        self._send = chain_publish(self._deliver, publish_middleware)
        # on a mesh with identities: who may answer a request is checked against these keys
        self.directory: KeyDirectory | None = None

    async def _deliver(self, out: Outgoing) -> Any:
        """The end of the publish chain: the transport (for a store in a handler, its run's
        outbox, which the runtime flushes before acknowledging what the handler handled)."""
        if out.kind == STORE:
            if out.outbox is not None:
                return await out.outbox.store(out.subject, out.data, out.headers)
            return await self.transport.store(out.subject, out.data, out.headers)
        if out.kind == REQUEST:
            return await self.transport.request(out.subject, out.data, out.timeout, headers=out.headers)
        await self.transport.publish(out.subject, out.data, out.headers)
        return None

    @classmethod
    async def connect(cls, settings: Settings, sender: str, *, url: str | None = None) -> MeshClient:
        """A client on its own connection; with an identity (MESH_NATS_CREDS), it signs."""
        signer = signer_of(settings)
        directory = known_directory(settings)
        transport = await NatsTransport.connect(settings, sender, url=url)
        middleware: list[PublishMiddleware] = [inject_trace]
        if signer is not None:
            middleware.append(signing(signer))
        if settings.record:
            writer = record_writer(sender, signer, directory)
            secret = settings.secret_header_names
            recorder = Recorder(transport, writer, secret_headers=secret, leave_to_agents=True)
            middleware.append(recording(recorder))
        client = cls(transport, sender, publish_middleware=middleware, signer=signer)
        client.directory = directory
        return client

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
        msg_id: str | None = None,
    ) -> Sent:
        """Publish `msg` as an event of its type: every agent handling the type gets it.

        `deadline` (seconds from now) travels downstream; work past it is dead-lettered.
        `msg_id`: give the same id when retrying a publish that may have been stored (after
        a timeout), so the stream drops the second copy.
        """
        conv = _conversation(conversation or lineage.conversation)
        lineage = _with_deadline(lineage, deadline)
        address = Address.event(conv, type_of(type(msg)).name)
        return await self.emit(address, msg, lineage, content_type, reply_to, msg_id=msg_id)

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
        durable: bool = True,
        route: Sequence[str] = (),
        msg_id: str | None = None,
    ) -> Sent:
        """Send `msg` to one agent (one replica of it handles it).

        Durable sends go to its JetStream inbox: stored before this returns, redelivered
        until handled. ``durable=False`` uses its direct line: core NATS, at most once,
        lower latency. ``route`` names the agents that handle the result after it, in
        order (a pipeline); the last one's result goes to ``reply_to``. ``msg_id`` as in
        `publish`.
        """
        conv = _conversation(conversation or lineage.conversation)
        lineage = _with_deadline(lineage, deadline)
        if route:
            lineage = replace(lineage, route=tuple(subjects.agent_name(a) for a in route))
        address = Address.inbox(conv, agent) if durable else Address.direct(conv, agent)
        return await self.emit(address, msg, lineage, content_type, reply_to, msg_id=msg_id)

    async def request(
        self,
        agent: str,
        msg: Message,
        reply_type: type[R],
        *,
        timeout: float = 5.0,
        lineage: Lineage = ROOT,
        conversation: str | None = None,
        content_type: str = JSON,
        errors: tuple[type[Message], ...] = (),
        answered_by: Sequence[str] = (),
    ) -> R:
        """Ask an agent over its direct line and wait for its typed answer.

        Raises `RequestError` if nobody answers in time or the answer is not a `reply_type`;
        `RequestRefused` (carrying the decoded answer) if it is one of the `errors` types.
        On a mesh with identities the answer must be signed by the agent asked, or by one of
        `answered_by` (the agent at the end of a handoff chain); anything else is a
        `RequestError`.
        """
        try:
            answer = await self.ask(
                agent,
                msg,
                timeout=timeout,
                lineage=lineage,
                conversation=conversation,
                content_type=content_type,
                answered_by=answered_by,
            )
        except TimeoutError:
            raise RequestError(f"no answer from agent {agent!r} within {timeout:g}s") from None
        got = (answer.headers or {}).get(h.TYPE, "")
        want = type_of(reply_type).name
        refusal = next((e for e in errors if got and type_of(e).name == got), None)
        if refusal is not None:
            ct = (answer.headers or {}).get(h.CONTENT_TYPE) or JSON
            try:
                refused = self.codec.decode(answer.data, refusal, ct)
            except DecodeError as exc:
                raise RequestError(f"agent {agent!r} answered with an invalid {got}: {exc.reason}") from None
            raise RequestRefused(agent, refused)
        if got and got != want:
            raise RequestError(f"agent {agent!r} answered with {got}, not {want}")
        try:
            return self.codec.decode(
                answer.data, reply_type, (answer.headers or {}).get(h.CONTENT_TYPE) or JSON
            )
        except DecodeError as exc:
            raise RequestError(f"agent {agent!r} answered with an invalid {want}: {exc.reason}") from None

    async def ask(
        self,
        agent: str,
        msg: Message,
        *,
        timeout: float = 5.0,
        lineage: Lineage = ROOT,
        conversation: str | None = None,
        content_type: str = JSON,
        answered_by: Sequence[str] = (),
    ) -> Any:
        """`request` for a caller that does not know the answer's type (the gateway): the raw
        answer, checked as `request` checks it (signed by the agent asked, or one of
        `answered_by`, on a mesh with identities; a delivery failure raised as `RequestFailed`).
        TimeoutError if no answer comes within `timeout`."""
        conv = _conversation(conversation or lineage.conversation)
        if lineage.deadline_ms is None:
            lineage = _with_deadline(lineage, timeout)
        mtype = type_of(type(msg))
        headers = self.headers(mtype.name, mtype.version, conv, lineage, content_type)
        if self.signer is not None:  # the answer comes to this sender's own inbox
            headers[REPLY_GRANT] = self.signer.grant(conv)
        subject = Address.direct(conv, agent).subject
        data = self.codec.encode(msg, content_type)
        loop = asyncio.get_running_loop()
        started, pause = loop.time(), NO_RESPONDERS_PAUSE
        while True:
            try:
                answer = await self._send(Outgoing(subject, data, dict(headers), REQUEST, timeout))
                break
            except Exception as exc:  # TimeoutError included: the caller says what it means
                if type(exc).__name__ != "NoRespondersError":
                    raise
                # a replica restarting, or one whose subscription the server has not yet
                # matched: ask again for a moment before saying nobody is there
                waited = loop.time() - started
                if waited + pause > min(timeout, NO_RESPONDERS_WAIT):
                    raise RequestError(f"no replica of agent {agent!r} is running ({subject})") from None
                await asyncio.sleep(pause)
                pause *= 2
        if self.directory is not None:
            self._check_answerer(answer, agent, answered_by or (agent,))
        if (answer.headers or {}).get(h.TYPE, "") == "mesh.delivery_failed":
            try:
                failed = self.codec.decode(answer.data, DeliveryFailed, JSON)
            except DecodeError:
                raise RequestError(f"agent {agent!r} could not handle the request") from None
            raise RequestFailed(agent, failed.kind, failed.reason)
        return answer

    def _check_answerer(self, answer: Any, agent: str, allowed: Sequence[str]) -> None:
        assert self.directory is not None
        headers = answer.headers or {}
        try:
            signer = verify_signature(answer.subject, headers, answer.data)
        except BadSignature as exc:
            raise RequestError(f"the answer to a request to {agent!r} is refused: {exc}") from None
        identity = self.directory.identity(signer) or ""
        kind, _, name = identity.partition(":")
        if kind != "agent" or name not in allowed or headers.get(h.SENDER) != name:
            who = identity or f"an unknown key {signer}"
            raise RequestError(
                f"the answer to a request to {agent!r} came from {who}, not from {', '.join(allowed)}"
            )

    async def emit(
        self,
        address: Address,
        msg: Message,
        lineage: Lineage = ROOT,
        content_type: str = JSON,
        reply_to: str = "",
        subject: str | None = None,
        msg_id: str | None = None,
        outbox: Outbox | None = None,
    ) -> Sent:
        """Publish to an address (or a raw reply `subject`), with full headers.

        Inboxes and events are stored: JetStream acknowledges before this returns, or, given
        an `outbox` (a handler's), by the time the outbox is flushed. Direct lines and replies
        to requesters are plain publishes.
        """
        mtype = type_of(type(msg))
        data = self.codec.encode(msg, content_type)
        headers = self.headers(mtype.name, mtype.version, address.conversation, lineage, content_type, msg_id)
        if reply_to or lineage.reply_to:
            headers[h.REPLY_TO] = reply_to or lineage.reply_to
            # passed on: its owner's grant; asked for here: this sender's own
            grant = "" if reply_to else lineage.reply_grant
            if not grant and self.signer is not None:
                grant = self.signer.grant(address.conversation)
            if grant:
                headers[REPLY_GRANT] = grant
        target = subject or address.subject
        if subject is None:
            kind = address.kind
        else:
            parsed = subjects.parse(subject)
            kind = parsed.kind if parsed is not None else subjects.REPLY
        stored = kind in (subjects.AGENT, subjects.EVENT, subjects.TIMER)
        await self._send(Outgoing(target, data, headers, STORE if stored else PUBLISH, outbox=outbox))
        return Sent(id=headers[h.ID], conversation=address.conversation, subject=target)

    async def send_raw(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, *, store: bool = False
    ) -> Any:
        """`data` and `headers` to `subject` as they are, through this client's publish chain
        (signed on a mesh with identities): input no typed message would make, to test what
        an agent does with it. ``store``: into the stream that captures `subject`."""
        out = Outgoing(subject, data, dict(headers or {}), STORE if store else PUBLISH)
        return await self._send(out)

    async def request_raw(
        self, subject: str, data: bytes, headers: dict[str, str] | None = None, *, timeout: float = 5.0
    ) -> Any:
        """As `send_raw`, as a request: the raw answer."""
        return await self._send(Outgoing(subject, data, dict(headers or {}), REQUEST, timeout))

    def headers(
        self,
        type_name: str,
        version: int,
        conversation: str,
        lineage: Lineage = ROOT,
        content_type: str = JSON,
        msg_id: str | None = None,
    ) -> dict[str, str]:
        msg_id = msg_id or h.new_id()
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
        if lineage.join:
            headers[h.JOIN] = lineage.join
        if lineage.answer:
            headers[h.ANSWER] = lineage.answer
        if lineage.route:
            headers[h.ROUTE] = ",".join(lineage.route)
        if lineage.depth:
            headers[h.DEPTH] = str(lineage.depth)
        if lineage.gathers:
            headers[h.GATHERS] = ",".join(lineage.gathers)
        return headers


def record_writer(sender: str, signer: Signer | None, directory: KeyDirectory | None) -> str:
    """The name a client records under (mesh.observability.record): its identity's (an
    agent's name, or its role: ``publisher``, ``operator``), which is all its credentials let
    it record as; without an identity, its sender name if that is a valid one."""
    identity = directory.identity(signer.public_key) if signer is not None and directory is not None else None
    if identity:
        return identity.partition(":")[2]
    return sender if subjects.is_agent_name(sender) else "client"


def _with_deadline(lineage: Lineage, seconds: float | None) -> Lineage:
    if seconds is None:
        return lineage
    return replace(lineage, deadline_ms=int(time.time() * 1000 + seconds * 1000))


def _conversation(value: str | None) -> str:
    return conversation_id(value) if value else h.new_id()
