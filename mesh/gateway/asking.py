"""A request over HTTP: `MeshClient.ask`, for a caller that does not know the answer's type in
advance. The answer is checked as `request` checks it (signed by the agent asked, on a mesh
with identities; a dead letter is a `RequestFailed`) and returned as decoded JSON."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mesh.observability.tap import decode_any
from mesh.runtime.client import Lineage, MeshClient
from mesh.wire import envelope as h
from mesh.wire.messages import Message


@dataclass(frozen=True, slots=True)
class Answered:
    conversation: str
    type: str
    body: Any


async def ask(client: MeshClient, agent: str, msg: Message, timeout: float) -> Answered:
    """Ask `agent` on its direct line; TimeoutError if no answer comes within `timeout`."""
    conv = h.new_id()
    lineage = Lineage(deadline_ms=int((time.time() + timeout) * 1000))
    answer = await client.ask(agent, msg, timeout=timeout, lineage=lineage, conversation=conv)
    headers = answer.headers or {}
    return Answered(conv, headers.get(h.TYPE, ""), decode_any(answer.data, headers.get(h.CONTENT_TYPE, "")))
