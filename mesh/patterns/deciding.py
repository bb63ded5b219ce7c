"""Deciding a tool call that waits for a person (mesh.patterns.approval): what `mesh approve`,
`mesh deny` and the gateway's web view send. The decision goes to the agent's timer subject,
which only the operator role (and the agent) may publish to."""

from __future__ import annotations

import asyncio
import time

from mesh.observability.tracing import continuing
from mesh.patterns.approval import ApprovalDecision, ApprovalState, approval_key, decision_subject, decoded
from mesh.runtime.client import Lineage, MeshClient
from mesh.transport import streams
from mesh.wire.envelope import is_id_token
from mesh.wire.errors import MeshError
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address

FIND_WAIT = 2.0  # seconds `decide` looks for an approval that is not listed yet


async def decide(
    client: MeshClient,
    settings: Settings,
    approval: str,
    *,
    approved: bool,
    by: str,
    reason: str = "",
    causation: str = "",
    wait: float = FIND_WAIT,
) -> ApprovalState:
    """Send a decision to the agent whose tool call waits under `approval` (`causation`: the
    id of the approval request it answers, when known, so the conversation's tree shows it).

    The approval is looked for during `wait` seconds: its `approval.request` event can
    arrive before the state is listed by the replica a cluster answers from."""
    transport = client.transport
    store = await transport.state(streams.bucket_specs(settings)[1], settings)
    got = None
    deadline = time.monotonic() + wait
    while is_id_token(approval):  # a key part: no wildcards
        for key in await store.keys(approval_key("*", approval)):
            got = await store.get(key)
        if got is not None or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    if got is None:
        raise MeshError(f"no approval {approval!r} is waiting (wrong id, or it expired and was cleaned up)")
    st = decoded(got[0])
    if st.status != "pending":
        raise MeshError(f"approval {approval} is already {st.status}" + (f" by {st.by}" if st.by else ""))
    decision = ApprovalDecision(approval=approval, approved=approved, by=by, reason=reason)
    address = Address.timer(st.conversation, st.agent)
    assert address.subject == decision_subject(st.conversation, st.agent)
    with continuing(st.traceparent):  # the decision is part of the conversation's trace
        await client.emit(address, decision, Lineage(conversation=st.conversation, causation=causation))
    return st
