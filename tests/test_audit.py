"""The audit trail on a real nats-server: tool calls, approval decisions, memory operations,
refusals and re-drives are appended with the identity and trace; every chain verifies, and a
changed or slipped-in record is found."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec
import pytest
from mesh_user_tools import REFUNDS, Ask, agent

from mesh.cli.audit import stored_records
from mesh.cli.dlq import redrive
from mesh.cli.llm import decide
from mesh.patterns.approval import ApprovalDecision, ApprovalRequest
from mesh.runtime import audit
from mesh.runtime.audit import AuditLog, AuditRecord
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.transport.identities import with_role
from mesh.transport.nats import NatsTransport
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.envelope import new_id
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address

REFUND = 'Please call refund({"order_id": "A-7", "amount_eur": 30})'


@pytest.fixture
def client(operator: MeshClient) -> MeshClient:
    """Reading the audit stream, deciding approvals and re-driving dead letters take the
    operator role, as `mesh audit`, `mesh approve` and `mesh dlq` have."""
    return operator


def _of(msgs: list[Any], suffix: str) -> list[Any]:
    return [m for m in msgs if m.subject.endswith(suffix)]


async def _records(transport: Any, conversation: str = "") -> list[AuditRecord]:
    got = [audit.decoded(data) async for _, _, data in stored_records(transport)]
    return [r for r in got if not conversation or r.conversation == conversation]


async def test_tool_calls_decisions_and_refusals_are_recorded_and_the_chains_verify(
    client: MeshClient, settings: Settings
) -> None:
    conv = "audit-flow"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        [req] = _of(await rec.wait_for(lambda ms: bool(_of(ms, "approval.request"))), "approval.request")
        approval = default_codec.decode(req.data, ApprovalRequest).approval
        # a decision on the inbox is refused (unauthorized) and recorded as such
        async with await MeshClient.connect(with_role(settings, "publisher"), "mallory") as mallory:
            forged = ApprovalDecision(approval=approval, approved=True)
            await mallory.emit(Address.inbox(conv, "clerk"), forged)
        await rec.wait_for(lambda ms: bool(_of(ms, "dlq.clerk")))
        await decide(client, settings, approval, approved=True, by="ada")
        await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))
    records = await _records(client.transport, conv)
    kinds = [(r.kind, r.actor, r.detail.get("status", "")) for r in records]
    assert ("unauthorized", "mallory", "") in kinds
    assert ("approval", client.sender, "approved") in kinds  # the sender, not the body's "ada"
    [call] = [r for r in records if r.kind == "tool_call"]
    # the call ran in the resumed message, which the agent sent itself after the decision
    assert call.writer == "clerk" and call.actor == "clerk" and call.detail["tool"] == "refund"
    assert call.detail["status"] == "ok" and len(call.trace_id) == 32
    arguments = {"order_id": "A-7", "amount_eur": 30}
    assert call.detail["arguments"] == audit.digest(arguments)  # a digest, never the arguments
    assert "A-7" not in msgspec.json.encode(call).decode()
    count, breaks = audit.verify([r async for r in stored_records(client.transport)])
    assert count >= 3 and breaks == []


async def test_a_changed_or_slipped_in_record_breaks_the_chain(client: MeshClient) -> None:
    log = AuditLog(client.transport, "auditor", new_id())
    for n in range(3):
        await log.append("tool_call", actor="someone", detail={"n": n})
    stored = [r async for r in stored_records(client.transport, "auditor") if r[0] == log.subject]
    assert [audit.decoded(d).seq for _, _, d in stored] == [1, 2, 3]
    assert audit.verify(stored) == (3, [])
    # changed afterwards: the next record names the original's hash
    subject, seq, data = stored[1]
    changed = data.replace(b'"n":"1"', b'"n":"7"')
    count, breaks = audit.verify([stored[0], (subject, seq, changed), stored[2]])
    assert count == 3 and [b.stream_seq for b in breaks] == [stored[2][1]]
    # removed: the record after the gap does not follow
    assert [b.stream_seq for b in audit.verify([stored[0], stored[2]])[1]] == [stored[2][1]]
    # slipped in on the stream by someone who may publish there
    fake = AuditRecord(kind="approval", writer="auditor", actor="ada", at=0, seq=4, prev="0" * 64)
    await client.transport.store(log.subject, msgspec.json.encode(fake))
    stored = [r async for r in stored_records(client.transport, "auditor") if r[0] == log.subject]
    [broken] = audit.verify(stored)[1]
    assert broken.stream_seq == stored[3][1] and "changed, removed or inserted" in broken.reason
    # while the writer's next record still names its own last one, so its chain goes on
    await log.append("tool_call", actor="someone")
    last = [r async for r in stored_records(client.transport, "auditor") if r[0] == log.subject][-1]
    assert audit.decoded(last[2]).prev == hashlib.sha256(stored[2][2]).hexdigest()


async def test_memory_operations_and_redrives_are_recorded(
    client: MeshClient, settings: Settings, tmp_path: Any
) -> None:
    from mesh.memory.client import Memory
    from mesh.memory.store import MemoryStore
    from mesh.services.memory import MemoryService, memory_agent

    name = f"memory-{new_id()[:8].lower()}"
    mem = settings.model_copy(update={"memory_agent": name, "memory_timeout": 15.0})

    async def open_store() -> MemoryStore:
        return await MemoryStore.from_settings(mem).open()

    service = MemoryService(open_store)
    conv = "audit-memory"
    async with running_agent(memory_agent(service, mem.memory_agent), mem):
        memory = Memory(client, mem)
        await memory.remember("the audit remembers")
        await memory.recall("audit")
    await service.close()
    memory_records = [r for r in await _records(client.transport) if r.writer == mem.memory_agent]
    assert [(r.kind, r.actor, r.detail["status"]) for r in memory_records] == [
        ("memory.remember", client.sender, "ok"),
        ("memory.recall", client.sender, "ok"),
    ]
    # a dead letter re-driven by the operator
    headers = {h.TYPE: "test.ask", h.ID: new_id(), h.CONVERSATION: conv, h.DLQ_KIND: "handler_error"}
    headers[h.DLQ_AGENT] = "audit-nobody"  # no such agent runs: the re-driven message just waits
    seq = await client.transport.store(f"mesh.{conv}.dlq.audit-nobody", b'{"text":"again"}', headers)
    assert isinstance(client.transport, NatsTransport)
    redriver = AuditLog(client.transport, "mesh-dlq", new_id())
    await redrive(client.transport, settings.dead_letter_stream, seq, audit=redriver)
    [done] = [r for r in await _records(client.transport, conv) if r.kind == "redrive"]
    assert done.writer == "mesh-dlq" and done.detail["seq"] == str(seq)
    assert done.detail["agent"] == "audit-nobody"


async def test_mesh_audit_lists_and_verify_reports_a_broken_chain(tmp_path: Any) -> None:
    """The commands, on a server of their own (the shared one holds other tests' chains)."""
    import os
    import subprocess
    import sys

    from mesh.testing import secure_nats_server

    with secure_nats_server(tmp_path / "nats") as srv:
        await srv.prepare()
        settings = srv.local(Settings.load(environ={}, data_dir=tmp_path / "data"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update({"MESH_NATS_URL": srv.url, "MESH_DATA_DIR": str(tmp_path / "data")})

        def mesh(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "mesh", "audit", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )

        transport = await NatsTransport.connect(with_role(settings, "operator"), "auditor")
        try:
            log = AuditLog(transport, "clerk", new_id())
            await log.append("tool_call", actor="triage", detail={"tool": "refund", "status": "ok"})
            await log.append("approval", actor="mesh-cli", detail={"status": "approved"})
            listed = mesh("ls", "--kind", "tool_call")
            assert listed.returncode == 0, listed.stderr
            assert "clerk#1  tool_call  by triage  tool=refund status=ok" in listed.stdout
            assert "approval" not in listed.stdout
            held = mesh("verify")
            assert held.returncode == 0 and "2 audit records in 1 chains: every chain holds" in held.stdout
            fake = AuditRecord(kind="approval", writer="clerk", actor="ada", at=0, seq=3, prev="f" * 64)
            await transport.store(log.subject, msgspec.json.encode(fake))
        finally:
            await transport.close()
        broken = mesh("verify")
    assert broken.returncode == 1
    assert f"broken: {log.subject} at stream sequence 3" in broken.stderr
    assert "1 break(s) in 3 audit records" in broken.stderr
