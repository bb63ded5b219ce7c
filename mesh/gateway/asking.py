"""A request over HTTP: `MeshClient.request` for a caller that does not know the answer's type
in advance. The answer is checked as `request` checks it (signed by the agent asked, on a
mesh with identities; a dead letter is a `RequestFailed`) and returned as decoded JSON."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from mesh.observability.tap import decode_any
from mesh.runtime.client import NO_RESPONDERS_PAUSE, NO_RESPONDERS_WAIT, Lineage, MeshClient
from mesh.runtime.deadletter import DeliveryFailed
from mesh.wire import envelope as h
from mesh.wire.codec import JSON
from mesh.wire.errors import DecodeError, RequestError, RequestFailed
from mesh.wire.messages import Message, type_of
from mesh.wire.signature import REPLY_GRANT
from mesh.wire.subjects import Address


@dataclass(frozen=True, slots=True)
class Answered:
    conversation: str
    type: str
    body: Any


async def ask(client: MeshClient, agent: str, msg: Message, timeout: float) -> Answered:
    """Ask `agent` on its direct line; TimeoutError if no answer comes within `timeout`."""
    conv = h.new_id()
    mtype = type_of(type(msg))
    lineage = Lineage(deadline_ms=int((time.time() + timeout) * 1000))
    headers = client.headers(mtype.name, mtype.version, conv, lineage)
    if client.signer is not None:  # the answer comes to this gateway's own inbox
        headers[REPLY_GRANT] = client.signer.grant(conv)
    subject = Address.direct(conv, agent).subject
    data = client.codec.encode(msg, JSON)
    loop = asyncio.get_running_loop()
    started, pause = loop.time(), NO_RESPONDERS_PAUSE
    while True:
        try:
            answer = await client.request_raw(subject, data, headers, timeout=timeout)
            break
        except Exception as exc:
            if type(exc).__name__ != "NoRespondersError":
                raise
            # a replica restarting: ask again for a moment before saying nobody is there
            if loop.time() - started + pause > min(timeout, NO_RESPONDERS_WAIT):
                raise RequestError(f"no replica of agent {agent!r} is running") from None
            await asyncio.sleep(pause)
            pause *= 2
    if client.directory is not None:
        client._check_answerer(answer, agent, (agent,))
    answer_headers = answer.headers or {}
    got = answer_headers.get(h.TYPE, "")
    if got == "mesh.delivery_failed":
        try:
            failed = client.codec.decode(answer.data, DeliveryFailed, JSON)
        except DecodeError:
            raise RequestError(f"agent {agent!r} could not handle the request") from None
        raise RequestFailed(agent, failed.kind, failed.reason)
    return Answered(conv, got, decode_any(answer.data, answer_headers.get(h.CONTENT_TYPE, "")))
