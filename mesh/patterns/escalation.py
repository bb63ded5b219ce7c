"""Escalation: work that failed its last retry goes to a fallback agent or to people, instead
of only the dead letters.

Declared per agent (``Agent(..., escalate=...)``) or per handler (``@agent.handler(escalate=
...)``, which wins): the name of a fallback agent, or `HUMAN`. When a handler fails on the
last delivery (``MESH_MAX_DELIVER``), or its process died on every one:

- **to an agent**: the message is sent to the fallback agent's inbox, as the escalating
  agent (it signs it), with a new id derived from the original (a redelivery escalates
  once), ``Mesh-Escalated-From`` (the agent that gave up) and ``Mesh-Escalation`` (why). The
  reply target and its grant go with it, so the fallback's answer reaches whoever asked;
- **to people** (`HUMAN`): the message is parked in ``MESH_STATE``
  (``escalations.<agent>.<id>``, under the agent's own keys) and an ``escalation.request``
  event says so. ``mesh escalations`` lists what waits; ``mesh escalations retry <id>
  [--to <agent>]`` sends it again (after a fix, or to another agent) and ``mesh
  escalations drop <id> --reason ...`` gives it up; either publishes
  ``escalation.resolved``. Resolving takes the operator role.

The delivery is acknowledged once the escalation is stored; if it cannot be, the message is
dead-lettered as before. Secret headers do not travel (mesh.wire.secrets).
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any, Final

import msgspec

from mesh.runtime.client import Lineage
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.envelope import derive_id, new_id
from mesh.wire.errors import ConfigError
from mesh.wire.messages import Message, message
from mesh.wire.secrets import without_secrets
from mesh.wire.signature import SIGNATURE, SIGNER

if TYPE_CHECKING:
    from mesh.runtime.client import MeshClient
    from mesh.runtime.ladder import Work
    from mesh.transport.state import StateStore

HUMAN: Final = "@human"  # escalate to people: the message waits in `mesh escalations`
ESCALATED_FROM: Final = "Mesh-Escalated-From"
ESCALATION: Final = "Mesh-Escalation"
# what a re-sent message does not keep: the sender and its proof (the resender signs anew)
_NOT_CARRIED: Final = frozenset({h.NATS_MSG_ID, h.SENDER, h.SENT_AT, SIGNATURE, SIGNER, h.ID})


@message("escalation.request")
class EscalationRequest(Message, frozen=True):
    """Work that failed its last retry waits for a person (`mesh escalations`)."""

    escalation: str
    agent: str
    type: str
    reason: str


@message("escalation.resolved")
class EscalationResolved(Message, frozen=True):
    """What a person did: ``retried`` (sent again, to `to`) or ``dropped``."""

    escalation: str
    status: str
    by: str = ""
    to: str = ""
    reason: str = ""


class EscalationState(msgspec.Struct):
    """A parked message: as it arrived (no secret headers), why it failed, what became of it."""

    id: str
    agent: str
    conversation: str
    subject: str
    headers: dict[str, str]
    data: str  # base64
    type: str
    reason: str
    parked_ms: int
    status: str = "waiting"  # waiting, retried, dropped
    by: str = ""
    to: str = ""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(EscalationState).decode


def escalation_key(agent: str, escalation_id: str) -> str:
    return f"escalations.{agent}.{escalation_id}"


class Escalations:
    """One agent's escalations: `escalate` is what the delivery ladder calls on a last failure."""

    def __init__(
        self, agent: str, state: StateStore, client: MeshClient, secret_headers: frozenset[str]
    ) -> None:
        self.agent = agent
        self.state = state
        self.client = client
        self.secret = secret_headers

    async def escalate(self, w: Work, reason: str) -> bool:
        """Hand the failed message on; False if its handler does not escalate."""
        target = w.handler.escalate if w.handler is not None else ""
        env, d = w.env, w.delivery
        if not target or env is None:
            return False
        escalation = derive_id(f"{env.id}/escalation", self.agent, 0)
        headers, _ = without_secrets(d.headers or {}, self.secret)
        if target != HUMAN:
            carried = _carried(headers)
            carried.update({ESCALATED_FROM: self.agent, ESCALATION: _one_line(reason), h.ID: escalation})
            carried[h.NATS_MSG_ID] = escalation
            carried[h.SENDER], carried[h.SENT_AT] = self.agent, str(h.now_ns())
            address = subjects.Address.inbox(env.conversation, target)
            await self.client.send_raw(address.subject, d.data, carried, store=True)
            return True
        st = EscalationState(
            id=escalation,
            agent=self.agent,
            conversation=env.conversation,
            subject=d.subject,
            headers=headers,
            data=base64.b64encode(d.data).decode(),
            type=env.type_name,
            reason=_one_line(reason),
            parked_ms=int(time.time() * 1000),
        )
        await self.state.put(escalation_key(self.agent, escalation), _encode(st))
        lineage = Lineage(conversation=env.conversation, causation=env.id, hop=env.hop + 1)
        request = EscalationRequest(
            escalation=escalation, agent=self.agent, type=env.type_name, reason=st.reason
        )
        await self.client.emit(
            subjects.Address.event(env.conversation, "escalation.request"), request, lineage
        )
        return True


async def pending(store: StateStore) -> list[EscalationState]:
    """Every escalation still waiting, oldest first (the operator's view)."""
    found = []
    for key in await store.keys(escalation_key("*", "*")):
        got = await store.get(key)
        if got is not None and (st := _decode(got[0])).status == "waiting":
            found.append(st)
    return sorted(found, key=lambda st: st.parked_ms)


async def resolve(
    client: MeshClient, store: StateStore, escalation_id: str, *, retry: bool, to: str = "", reason: str = ""
) -> EscalationState:
    """Retry (to the agent, or `to`) or drop a waiting escalation, once: a second resolve of
    the same one is a ConfigError that says what became of it."""
    found = [st for st in await pending(store) if st.id == escalation_id]
    if not found:
        raise ConfigError(f"no escalation {escalation_id!r} is waiting: see `mesh escalations`")
    st = found[0]
    key = escalation_key(st.agent, st.id)
    got = await store.get(key)
    if got is None or _decode(got[0]).status != "waiting":
        raise ConfigError(f"escalation {escalation_id!r} was resolved meanwhile")
    target = subjects.agent_name(to) if to else st.agent
    st.status, st.by, st.to = ("retried" if retry else "dropped"), client.sender, target if retry else ""
    if await store.update(key, _encode(st), got[1]) is None:
        raise ConfigError(f"escalation {escalation_id!r} was resolved meanwhile")
    if retry:  # without its deadline, as `mesh dlq redrive` does: a person took their time
        carried = _carried(st.headers)
        carried.pop(h.DEADLINE, None)
        carried.update({h.ID: new_id(), h.CAUSATION: st.headers.get(h.ID, ""), ESCALATION: st.reason})
        carried[h.NATS_MSG_ID], carried[h.SENDER], carried[h.SENT_AT] = (
            carried[h.ID],
            client.sender,
            str(h.now_ns()),
        )
        subject = subjects.Address.inbox(st.conversation, target).subject
        await client.send_raw(subject, base64.b64decode(st.data), carried, store=True)
    resolved = EscalationResolved(
        escalation=st.id, status=st.status, by=client.sender, to=st.to, reason=reason
    )
    await client.emit(
        subjects.Address.event(st.conversation, "escalation.resolved"),
        resolved,
        Lineage(conversation=st.conversation),
    )
    return st


def summary(st: EscalationState) -> dict[str, Any]:
    return {
        "id": st.id,
        "agent": st.agent,
        "type": st.type,
        "conversation": st.conversation,
        "reason": st.reason,
        "age_s": round(max(0.0, time.time() - st.parked_ms / 1000), 1),
    }


def _carried(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in _NOT_CARRIED}


def _one_line(text: str, limit: int = 500) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
