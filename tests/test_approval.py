"""Human approval: a high-risk tool call parks the work durably (no waiting coroutine),
survives a restart of the agent, resumes on the decision, and expires cleanly."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import mesh_cli
from mesh_user_tools import REFUNDS, Answered, Ask, Refund, agent

from mesh.agent.identity import provision
from mesh.cli.llm import decide
from mesh.cli.main import cli
from mesh.observability import history
from mesh.patterns.approval import ApprovalRequest, ApprovalResolved
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.settings import Settings

REFUND = 'Please call refund({"order_id": "A-9", "amount_eur": 20})'


@pytest.fixture
def client(operator: MeshClient) -> MeshClient:
    """The person who asks and decides: deciding an approval takes the operator role (as
    `mesh approve` has), and so does a timer sent by anyone but the agent."""
    return operator


async def _approvals(settings: Settings) -> list[dict[str, Any]]:
    """`mesh approvals --json`, as the operator on this machine (from the data dir)."""
    env = {"MESH_NATS_URL": settings.nats_url or "", "MESH_DATA_DIR": str(settings.data_dir)}
    result = await asyncio.to_thread(CliRunner().invoke, cli, ["approvals", "--json"], env=env)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.output.splitlines()]


def _of(msgs: list[Any], suffix: str) -> list[Any]:
    return [m for m in msgs if m.subject.endswith(suffix)]


async def _requested(rec: Recorder) -> tuple[Any, str]:
    """The parked call's approval.request as it went out, and its approval id."""
    [req] = _of(await rec.wait_for(lambda ms: bool(_of(ms, "approval.request"))), "approval.request")
    return req, default_codec.decode(req.data, ApprovalRequest).approval


async def test_approval_survives_a_restart_and_resumes_on_approve(
    client: MeshClient, settings: Settings
) -> None:
    conv = "approve-restart"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.>")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        [req] = _of(await rec.wait_for(lambda ms: bool(_of(ms, "approval.request"))), "approval.request")
    # the agent process is gone; nothing ran and nothing waits in memory
    request = default_codec.decode(req.data, ApprovalRequest)
    assert request.tool == "refund" and '"amount_eur":20' in request.arguments
    assert REFUNDS == []
    # `mesh approvals` shows it waiting, with its age, agent, tool and arguments
    [row] = [r for r in await _approvals(settings) if r["id"] == request.approval]
    assert (row["agent"], row["tool"], row["conversation"]) == ("clerk", "refund", conv)
    assert row["arguments"] == {"order_id": "A-9", "amount_eur": 20} and row["age_s"] >= 0
    async with running_agent(agent, settings):  # a fresh runtime: a restart
        st = await decide(client, settings, request.approval, approved=True, by="ada", reason="ok")
        assert st.status == "pending" and st.tool == "refund"
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))
    assert not [r for r in await _approvals(settings) if r["id"] == request.approval]
    assert [Refund(order_id="A-9", amount_eur=20)] == REFUNDS
    [resolved] = [default_codec.decode(m.data, ApprovalResolved) for m in _of(msgs, "approval.resolved")]
    # recorded with the identity that sent the decision; the body's name is only shown
    assert resolved.status == "approved" and resolved.by == client.sender and resolved.person == "ada"
    [answer] = [default_codec.decode(m.data, Answered) for m in _of(msgs, "test.answered")]
    assert answer.calls == ["refund"] and "Refunded 20 EUR on A-9." in answer.text


async def test_a_denied_call_never_runs_and_the_model_is_told(client: MeshClient, settings: Settings) -> None:
    conv = "approve-deny"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.>")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        _req, approval = await _requested(rec)
        await decide(client, settings, approval, approved=False, by="bob", reason="too much")
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))
    assert REFUNDS == []
    [answer] = [default_codec.decode(m.data, Answered) for m in _of(msgs, "test.answered")]
    assert answer.errors == ["refund:denied"]


async def test_an_unanswered_request_expires_into_a_dead_letter(
    client: MeshClient, settings: Settings
) -> None:
    conv = "approve-expire"
    REFUNDS.clear()
    quick = settings.model_copy(update={"approval_timeout": 0.3})
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, quick):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "dlq.clerk")), timeout=20)
    [dead] = _of(msgs, "dlq.clerk")
    assert dead.headers[h.DLQ_KIND] == "approval_expired"
    assert "refund" in dead.headers[h.DLQ_REASON]
    assert default_codec.decode(dead.data, Ask).text == REFUND  # the original work is kept
    [resolved] = [default_codec.decode(m.data, ApprovalResolved) for m in _of(msgs, "approval.resolved")]
    assert resolved.status == "expired"
    assert REFUNDS == []
    # looked back at, the conversation failed: its work was dead-lettered
    for _ in range(100):
        recorded = await history.conversation(client.transport, conv)
        if any(m.type == "approval.resolved" for m in recorded):
            break
        await asyncio.sleep(0.05)
    assert history.summarize(conv, recorded).status == history.FAILED


async def test_mesh_tools_lists_and_mesh_approve_and_deny_decide(
    client: MeshClient, settings: Settings
) -> None:
    """The commands a person uses: `mesh tools`, `mesh deny`, `mesh approve` (and their errors)."""
    conv = "approve-cli"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.>")
    async with running_agent(agent, settings):
        listed = await mesh_cli(settings, "tools")
        assert listed.returncode == 0, listed.stderr
        assert "refund" in listed.stdout and "clerk" in listed.stdout
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        _req, approval = await _requested(rec)
        denied = await mesh_cli(settings, "deny", approval)
        assert denied.returncode != 0 and "--reason" in denied.stderr  # a denial says why
        approved = await mesh_cli(settings, "approve", approval, "--by", "ada")
        assert approved.returncode == 0, approved.stderr
        again = await mesh_cli(settings, "approve", approval)
        assert again.returncode != 0  # decided already (or gone): said, not ignored
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))
    [answer] = [default_codec.decode(m.data, Answered) for m in _of(msgs, "test.answered")]
    assert answer.calls == ["refund"]
    assert [Refund(order_id="A-9", amount_eur=20)] == REFUNDS


async def test_every_message_of_an_approval_has_its_own_id(client: MeshClient, settings: Settings) -> None:
    # approval.resolved and the re-sent message are both sent while handling the decision
    conv = "approve-ids"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, settings):
        sent = await client.send("clerk", Ask(text=REFUND), conversation=conv)
        _req, approval = await _requested(rec)
        await decide(client, settings, approval, approved=True, by="ada")
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))
    [resolved] = _of(msgs, "approval.resolved")
    [resumed] = [m for m in _of(msgs, "agent.clerk") if m.headers.get(h.CAUSATION) == sent.id]
    assert resumed.headers[h.TYPE] == "test.ask"
    assert resolved.headers[h.ID] != resumed.headers[h.ID]
    ids = [m.headers[h.ID] for m in msgs]
    assert len(ids) == len(set(ids)), ids


async def test_a_replayed_resume_runs_the_approved_tool_once(client: MeshClient, settings: Settings) -> None:
    """The approved call is claimed (compare-and-set) before it runs: the resumed message
    stored again with a fresh stream id, after its processed record is gone, answers from
    the recorded result and does not refund twice."""
    from mesh.transport import streams

    conv = "approve-replay"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        _req, approval = await _requested(rec)
        await decide(client, settings, approval, approved=True, by="ada")
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))
        assert len(REFUNDS) == 1
        [first, resumed] = [m for m in _of(msgs, "agent.clerk") if m.headers[h.TYPE] == "test.ask"]
        assert resumed.headers[h.CAUSATION] == first.headers[h.ID]
        processed = await client.transport.state(streams.bucket_specs(settings)[0], settings)
        key = streams.processed_key("clerk", resumed.headers[h.ID])
        async with asyncio.timeout(10):  # written after the handler's answer went out
            while await processed.get(key) is None:  # noqa: ASYNC110 - the agent's record
                await asyncio.sleep(0.02)
        await processed.delete(key)
    # replayed to a fresh runtime (a restart), which has not seen the message's id before:
    # only the claim stands between it and a second refund
    replay = {**resumed.headers, h.NATS_MSG_ID: "replayed-" + resumed.headers[h.ID]}
    await client.transport.store(resumed.subject, resumed.data, replay)
    async with running_agent(agent, settings):
        msgs = await rec.wait_for(lambda ms: len(_of(ms, "test.answered")) == 2)
    assert len(REFUNDS) == 1
    answers = [default_codec.decode(m.data, Answered) for m in _of(msgs, "test.answered")]
    assert [a.calls for a in answers] == [["refund"], ["refund"]]  # the replay got the recorded result


async def test_a_timer_from_anyone_but_the_agent_is_refused(client: MeshClient, settings: Settings) -> None:
    """Whoever may publish on the timer subject (the operator role) cannot expire an
    approval early: a timer is taken only from the agent itself."""
    from mesh.patterns.approval import ApprovalTimer
    from mesh.runtime.client import Lineage
    from mesh.wire.subjects import Address

    conv = "approve-fake-timer"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        _req, approval = await _requested(rec)
        fake = ApprovalTimer(approval=approval, due_ms=1)
        await client.emit(Address.timer(conv, "clerk"), fake, Lineage(conversation=conv))
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "dlq.clerk")))
        [dead] = _of(msgs, "dlq.clerk")
        assert dead.headers[h.DLQ_KIND] == "unauthorized"
        assert not _of(msgs, "approval.resolved")
        st = await decide(client, settings, approval, approved=True, by="ada")  # still pending
        assert st.status == "pending"
        await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))
    assert len(REFUNDS) == 1


async def test_an_agent_cannot_decide_its_own_approval(client: MeshClient, settings: Settings) -> None:
    """The agent may publish on its own timer subject, but a decision it sends is refused:
    a person decides, and the decision is recorded with the identity that sent it."""
    from mesh.patterns.approval import ApprovalDecision
    from mesh.runtime.client import Lineage
    from mesh.wire.subjects import Address

    conv = "approve-self"
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        _req, approval = await _requested(rec)
        async with await MeshClient.connect(await provision(agent, settings), "clerk") as as_clerk:
            forged = ApprovalDecision(approval=approval, approved=True, by="the boss")
            await as_clerk.emit(Address.timer(conv, "clerk"), forged, Lineage(conversation=conv))
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "dlq.clerk")))
    assert _of(msgs, "dlq.clerk")[0].headers[h.DLQ_KIND] == "unauthorized"
    assert REFUNDS == [] and not _of(msgs, "approval.resolved")


@pytest.mark.parametrize("decider", ["mesh approve", "any client"])
async def test_the_decision_and_the_resumed_run_stay_in_the_conversations_trace(
    client: MeshClient, settings: Settings, decider: str
) -> None:
    """The trace context is kept with the parked call: `mesh approve` sends its decision in
    the conversation's trace, and the resumed run continues it even when the decision came
    from a client that carried no trace context (or another trace) of its own."""
    from mesh.patterns.approval import ApprovalDecision
    from mesh.runtime.client import Lineage
    from mesh.wire.subjects import Address

    conv = "approve-trace-" + decider.replace(" ", "-")
    REFUNDS.clear()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, settings):
        await client.send("clerk", Ask(text=REFUND), conversation=conv)
        req, approval = await _requested(rec)
        if decider == "mesh approve":
            await decide(client, settings, approval, approved=True, by="ada")
        else:  # a program of its own, publishing the decision outside any trace of this one
            decision = ApprovalDecision(approval=approval, approved=True, by="ada")
            await client.emit(Address.timer(conv, "clerk"), decision, Lineage(conversation=conv))
        msgs = await rec.wait_for(lambda ms: bool(_of(ms, "test.answered")))

    def trace_of(m: Any) -> str:
        return str(m.headers[h.TRACEPARENT].split("-")[1])

    conversation_trace = trace_of(req)
    asks = [m for m in _of(msgs, "agent.clerk") if m.headers[h.TYPE] == "test.ask"]
    assert len(asks) == 2  # the test's own (sent outside any trace) and the resumed one
    assert trace_of(asks[1]) == conversation_trace
    assert {trace_of(m) for m in _of(msgs, "test.answered")} == {conversation_trace}
    [decided] = [m for m in msgs if m.headers.get(h.TYPE) == "approval.decision"]
    if decider == "mesh approve":
        assert trace_of(decided) == conversation_trace
