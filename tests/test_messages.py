"""Message types: stable names and versions, and a typed round trip of every one over NATS."""

from __future__ import annotations

import memory_samples
import mesh.schemas  # noqa: F401
import pytest
from mesh.schemas.support import PolicyNote, ReplyDrafted, ResearchFindings, ResearchRequest, TicketOpened
from sample_agents import budgeted, journaled, slowpoke
from sample_agents import handoffs as ho
from sample_agents import lookback as lb
from sample_agents import sandboxed as sbx
from sample_agents.echo import Ping, Pong
from sample_agents.ledger import InvoiceBooked, InvoicePaid
from sample_agents.relay import Baton, Finished
from sample_agents.webview import WebDone, WebOrder

from mesh.join import HandedOn, JoinTimer, JudgeRequest, JudgeVerdict
from mesh.llm.streaming import LLMChunk, LLMFinal
from mesh.patterns.approval import ApprovalDecision, ApprovalRequest, ApprovalResolved, ApprovalTimer
from mesh.patterns.escalation import EscalationRequest, EscalationResolved
from mesh.runtime.client import MeshClient
from mesh.runtime.deadletter import DeliveryFailed
from mesh.testing import Recorder
from mesh.wire.codec import JSON, MSGPACK, default_codec
from mesh.wire.errors import DecodeError, RegistrationError, UnknownTypeError
from mesh.wire.messages import Message, message, registry, type_of

_ticket = TicketOpened(ticket_id="T-1", customer="Ada", subject="Refund", body="Charged twice")
_request = ResearchRequest(
    ticket=_ticket, category="billing", priority="high", summary="s", keywords=["refund"]
)
SAMPLES: dict[str, Message] = {
    "support.ticket_opened": _ticket,
    "support.research_request": _request,
    "support.research_findings": ResearchFindings(request=_request, findings=["f"], sources=["kb-1"]),
    "support.policy_note": PolicyNote(ticket_id="T-1", rules=["r"], escalate=True),
    "support.reply_drafted": ReplyDrafted(ticket_id="T-1", category="billing", priority="high", reply="Hi"),
    "test.ping": Ping(text="p", n=1),
    "test.web_order": WebOrder(order="o-1", note="<img src=x onerror=alert(1)>"),
    "test.web_done": WebDone(answer="a", calls=["refund"]),
    "test.pong": Pong(text="p", n=1, pid=2, instance="i"),
    "test.baton": Baton(token="t", path=["a"]),
    "test.finished": Finished(token="t", path=["a", "b"]),
    "test.chain": ho.Chain(conversation="c", marks=["a"], work_ms=1),
    "test.chain_done": ho.ChainDone(conversation="c", marks=["a", "b"]),
    "test.task": ho.Task(text="t", workers=2, deadline=1.5),
    "test.work": ho.Work(text="t", n=1),
    "test.work_done": ho.WorkDone(text="t", n=1, answer="a", by=1),
    "test.summary": ho.Summary(text="t", answers=["a"], missing=[], timed_out=False),
    "mesh.join_timer": JoinTimer(join="j1", due_ms=1),
    "test.journal_task": journaled.Task(prompt="p", gate="/tmp/gate"),
    "test.case": lb.Case(order="B-7"),
    "escalation.request": EscalationRequest(escalation="E1", agent="a", type="t.x", reason="r"),
    "escalation.resolved": EscalationResolved(escalation="E1", status="retried", by="op", to="a"),
    "test.slow_task": slowpoke.SlowTask(n=1, mode="tool"),
    "test.slow_done": slowpoke.SlowDone(n=1),
    "test.check": lb.Check(order="B-7", n=1),
    "test.checked": lb.Checked(order="B-7", n=1, ok=True),
    "test.journal_asked": journaled.Asked(text="t", pid=1),
    "test.journal_done": journaled.Done(text="t", pid=1),
    "test.budget_question": budgeted.Question(prompt="p"),
    "test.budget_answer": budgeted.Answer(text="t", pid=1),
    "test.invoice_paid": InvoicePaid(invoice="I-1"),
    "test.sbx_ask": sbx.SbxAsk(text="call probe({})"),
    "test.sbx_answered": sbx.SbxAnswered(outputs=["o"], errors=["crash:failed:died"]),
    "test.sbx_ping": sbx.SbxPing(marker="/tmp/pid"),
    "test.sbx_pong": sbx.SbxPong(tool_pid=1, tool_alive=True),
    "test.invoice_booked": InvoiceBooked(invoice="I-1"),
    "mesh.delivery_failed": DeliveryFailed(kind="validation", reason="r", agent="a", message_id="m"),
    "mesh.judge_request": JudgeRequest(join="j/1", candidates=['{"a":1}'], agents=["x"]),
    "mesh.judge_verdict": JudgeVerdict(choice=0, reason="r"),
    "mesh.join_handed_on": HandedOn(to="research"),
    "llm.chunk": LLMChunk(stream="s1", seq=0, text="Hel", agent="writer"),
    "approval.request": ApprovalRequest(
        approval="a1",
        agent="clerk",
        tool="refund",
        arguments="{}",
        expires_ms=1,
        decide_on="mesh.c.agent.clerk",
    ),
    "approval.decision": ApprovalDecision(approval="a1", approved=False, by="ada", reason="no"),
    "approval.resolved": ApprovalResolved(approval="a1", status="denied", by="ada", reason="no"),
    "mesh.approval_timer": ApprovalTimer(approval="a1", due_ms=1),
    "llm.final": LLMFinal(stream="s1", text="Hello", chunks=2, agent="writer", model="m", provider="p"),
    **{type_of(type(m)).name: m for m in memory_samples.ALL},
}


def test_every_registered_type_has_a_sample_here() -> None:
    """A new message type must be added to SAMPLES, so the round trip below covers it."""
    names = {t.name for t in registry if not t.cls.__module__.startswith(("mesh_user", "test_"))}
    assert names <= set(SAMPLES), f"add samples for: {sorted(names - set(SAMPLES))}"


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
@pytest.mark.parametrize("name", sorted(SAMPLES))
async def test_typed_round_trip_over_nats(client: MeshClient, name: str, content_type: str) -> None:
    sample = SAMPLES[name]
    conv = f"rt-{name.replace('.', '-')}-{content_type.split('/')[1]}"
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    await client.publish(sample, conversation=conv, content_type=content_type)
    [msg] = await rec.wait_count(1)
    mtype = type_of(type(sample))
    assert msg.headers["Mesh-Type"] == mtype.name
    assert msg.headers["Mesh-Version"] == str(mtype.version)
    assert default_codec.decode(msg.data, type(sample), msg.headers.get("Content-Type", JSON)) == sample


def test_names_must_be_dotted_lowercase() -> None:
    with pytest.raises(RegistrationError, match="not valid"):
        message("NoDomain")
    with pytest.raises(RegistrationError, match="version must be"):
        message("a.b", version=0)


def test_a_name_and_version_belong_to_one_class() -> None:
    with pytest.raises(RegistrationError, match="declared twice"):

        @message("test.ping", version=1)
        class Impostor(Message):
            other: int


def test_new_versions_are_new_types_and_latest_wins() -> None:
    @message("test.versioned", version=1)
    class V1(Message):
        a: int

    @message("test.versioned", version=2)
    class V2(Message):
        a: int
        b: str = ""  # evolution: new fields get defaults

    assert registry.get("test.versioned").cls is V2
    assert registry.get("test.versioned", 1).cls is V1
    # a v2 body still decodes as v1 (unknown fields are ignored) and v1 as v2 (defaults fill in)
    assert default_codec.decode(default_codec.encode(V2(a=1, b="x")), V1) == V1(a=1)
    assert default_codec.decode(default_codec.encode(V1(a=1)), V2) == V2(a=1)
    with pytest.raises(UnknownTypeError):
        registry.get("test.versioned", 3)


def test_decode_errors_are_the_projects_own() -> None:
    with pytest.raises(DecodeError) as bad_json:
        default_codec.decode(b"\xff", Ping)
    assert bad_json.value.kind == "decode"
    with pytest.raises(DecodeError) as invalid:
        default_codec.decode(b'{"text": []}', Ping)
    assert invalid.value.kind == "validation"
    with pytest.raises(DecodeError, match="unsupported Content-Type"):
        default_codec.decode(b"{}", Ping, "text/plain")


def test_hostile_nesting_is_a_decode_error_not_a_crash() -> None:
    from typing import Any

    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(DecodeError) as info:
        default_codec.decode(b'{"a": ' + deep + b"}", dict[str, Any])
    assert info.value.kind == "decode"
