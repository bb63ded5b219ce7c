"""Policies (mesh.patterns.policy): CEL rules from MESH_POLICY_FILE on every tool call,
outgoing message and model reply, on a real nats-server; and the checks made at load."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from conftest import TESTS
from mesh_user_policy import REFUNDED
from mesh_user_policy import agent as cashier
from mesh_user_tools import Answered, Ask, agent
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.agent.runner import AgentRuntime
from mesh.cli.audit import stored_records
from mesh.cli.llm import decide
from mesh.llm.types import Reply, Text
from mesh.middleware.publish import Outgoing
from mesh.patterns import policy as policy_module
from mesh.patterns import rules
from mesh.patterns.approval import ApprovalRequest
from mesh.patterns.policy import Policy, PolicyDenied
from mesh.runtime import audit
from mesh.runtime.audit import AuditRecord
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.wire import envelope as h
from mesh.wire.codec import JSON, default_codec
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

EXAMPLES = TESTS.parent / "policies" / "examples.toml"


@pytest.fixture
def client(operator: MeshClient) -> MeshClient:
    """Reading the audit stream and deciding approvals take the operator role."""
    return operator


def _with_rules(settings: Settings, text: str, **more: Any) -> Settings:
    path = settings.data_dir / "policy.toml"
    path.write_text(text)
    return settings.model_copy(update={"policy_file": path, **more})


async def _ask(client: MeshClient, settings: Settings, conv: str, text: str, who: Any = agent) -> Answered:
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.answered")
    async with running_agent(who, settings):
        await client.send(who.name, Ask(text=text), conversation=conv)
        [msg] = await rec.wait_count(1, timeout=30)
    await rec.stop()
    return default_codec.decode(msg.data, Answered)


async def _policy_records(client: MeshClient, conv: str) -> list[AuditRecord]:
    got = [audit.decoded(data) async for _, _, data in stored_records(client.transport)]
    return [r for r in got if r.conversation == conv and r.kind == "policy"]


async def test_a_denied_tool_call_is_told_to_the_model_and_audited_with_its_rule(
    client: MeshClient, settings: Settings, spans: InMemorySpanExporter
) -> None:
    conv = "policy-deny"
    governed = _with_rules(
        settings,
        """
[[rule]]
name = "legal-hold"
on = "tool"
when = 'tool == "lookup_order" && args.order_id == "A-13"'
decision = "deny"
reason = "order A-13 is under legal hold"
""",
    )
    text = 'call lookup_order({"order_id": "A-13"}) call lookup_order({"order_id": "A-2"})'
    answer = await _ask(client, governed, conv, text)
    assert answer.errors == ["lookup_order:policy_denied"] and answer.calls == ["lookup_order"]
    assert "Order A-2 shipped on Monday." in answer.text
    [record] = await _policy_records(client, conv)
    assert record.writer == "clerk" and record.actor == client.sender
    assert record.detail["rule"] == "legal-hold" and record.detail["decision"] == "deny"
    assert record.detail["enforced"] == "yes" and record.detail["subject"] == "lookup_order"
    assert record.detail["reason"] == "order A-13 is under legal hold"
    assert record.detail["where"].endswith("policy.toml:2")
    # the model was told why, as a tool error
    calls = [r for r in (await _all(client, conv)) if r.kind == "tool_call"]
    assert [c.detail["status"] for c in calls] == ["policy_denied", "ok"]
    # and the handler's span carries the matched rule
    [span] = [
        s for s in spans.get_finished_spans() if (s.attributes or {}).get("mesh.policy.rule") == "legal-hold"
    ]
    [event] = [e for e in span.events if e.name == "mesh.policy"]
    assert event.attributes is not None and event.attributes["mesh.policy.decision"] == "deny"


async def _all(client: MeshClient, conv: str) -> list[AuditRecord]:
    got = [audit.decoded(data) async for _, _, data in stored_records(client.transport)]
    return [r for r in got if r.conversation == conv]


async def test_an_outgoing_message_field_is_redacted(client: MeshClient, settings: Settings) -> None:
    conv = "policy-redact"
    governed = _with_rules(
        settings,
        """
[[rule]]
name = "no-order-ids-in-answers"
on = "message"
when = 'type == "test.answered"'
decision = "redact"
fields = ["text"]
pattern = 'A-[0-9]+'

[[rule]]
name = "no-tool-names-in-answers"
on = "message"
when = 'type == "test.answered" && size(body.calls) > 0'
decision = "redact"
fields = ["calls"]
""",
    )
    answer = await _ask(client, governed, conv, 'call lookup_order({"order_id": "A-7"})')
    assert "Order [redacted] shipped on Monday." in answer.text and "A-7" not in answer.text
    assert answer.calls == ["[redacted]"]
    records = await _policy_records(client, conv)
    assert {r.detail["rule"] for r in records} == {"no-order-ids-in-answers", "no-tool-names-in-answers"}
    assert {r.detail["decision"] for r in records} == {"redact"}


async def test_a_refund_over_the_limit_waits_for_approval_and_one_under_it_runs(
    client: MeshClient, settings: Settings
) -> None:
    governed = _with_rules(settings, EXAMPLES.read_text())
    REFUNDED.clear()
    small = await _ask(
        client, governed, "policy-small", 'call refund({"order_id": "A-1", "amount_eur": 20})', cashier
    )
    assert small.calls == ["refund"] and [r.amount_eur for r in REFUNDED] == [20]
    conv = "policy-big"
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.>")
    async with running_agent(cashier, governed):
        await client.send(
            "cashier", Ask(text='call refund({"order_id": "A-2", "amount_eur": 250})'), conversation=conv
        )
        msgs = await rec.wait_for(
            lambda ms: any(m.subject.endswith("approval.request") for m in ms), timeout=30
        )
        [req] = [
            default_codec.decode(m.data, ApprovalRequest)
            for m in msgs
            if m.subject.endswith("approval.request")
        ]
        assert req.tool == "refund" and '"amount_eur":250' in req.arguments
        assert [r.amount_eur for r in REFUNDED] == [20]  # parked: nothing ran
        await decide(client, governed, req.approval, approved=True, by="ada")
        msgs = await rec.wait_for(lambda ms: any(m.subject.endswith("test.answered") for m in ms), timeout=30)
    [answer] = [default_codec.decode(m.data, Answered) for m in msgs if m.subject.endswith("test.answered")]
    assert answer.calls == ["refund"] and [r.amount_eur for r in REFUNDED] == [20, 250]
    [record, *_] = await _policy_records(client, conv)
    assert (
        record.detail["rule"] == "refunds-over-100-need-approval" and record.detail["decision"] == "approve"
    )


async def test_report_only_records_what_would_happen_without_enforcing(
    client: MeshClient, settings: Settings
) -> None:
    conv = "policy-report"
    governed = _with_rules(
        settings,
        """
[[rule]]
name = "no-lookups"
on = "tool"
when = 'tool == "lookup_order"'
decision = "deny"
""",
        policy_report_only=True,
    )
    answer = await _ask(client, governed, conv, 'call lookup_order({"order_id": "A-3"})')
    assert answer.calls == ["lookup_order"] and answer.errors == []
    [record] = await _policy_records(client, conv)
    assert record.detail["rule"] == "no-lookups" and record.detail["decision"] == "deny"
    assert record.detail["enforced"] == "report-only"


async def test_tool_calls_per_conversation_are_limited(client: MeshClient, settings: Settings) -> None:
    conv = "policy-limit"
    governed = _with_rules(
        settings,
        """
[[rule]]
name = "two-calls"
on = "tool"
when = "calls >= 2"
decision = "deny"
reason = "two tool calls per conversation"
""",
    )
    text = " ".join(f'call lookup_order({{"order_id": "A-{n}"}})' for n in range(4))
    answer = await _ask(client, governed, conv, text)
    assert answer.calls == ["lookup_order", "lookup_order"]
    assert answer.errors == ["lookup_order:policy_denied", "lookup_order:policy_denied"]
    records = await _policy_records(client, conv)
    assert [r.detail["rule"] for r in records] == ["two-calls", "two-calls"]


async def test_a_denied_model_reply_fails_the_handling_and_a_redacted_one_is_cut() -> None:
    settings = Settings.load(environ={}, trace_exporter="none")
    policy = Policy(
        rules.parse(
            """
[[rule]]
name = "keys"
on = "output"
when = 'text.contains("sk-")'
decision = "redact"
pattern = 'sk-[a-z0-9]+'

[[rule]]
name = "no-threats"
on = "output"
when = 'lower(text).contains("or else")'
decision = "deny"
reason = "no threats"
""",
            "inline.toml",
        ),
        "clerk",
        settings.tenant,
    )
    cut = await policy.check_output(Reply(content=[Text("your key is sk-abc123, keep it")]))
    assert cut.text == "your key is [redacted], keep it"
    with pytest.raises(PolicyDenied, match="no-threats") as denied:
        await policy.check_output(Reply(content=[Text("Pay now OR ELSE")]))
    assert denied.value.kind == "policy_denied"


def test_a_bad_rule_is_refused_at_load_with_its_line_and_reason(tmp_path: Path) -> None:
    cases = {  # the bad rule's header is line 7 of the file, its keys from line 9
        'on = "message"\nwhen = "true"\ndecision = "approve"': (11, "on 'message' it must be one of"),
        'on = "tool"\nwhen = "tool =="\ndecision = "deny"': (10, "does not parse"),
        'on = "tool"\nwhen = "tol == 1"\ndecision = "deny"': (10, "unknown name 'tol' (did you mean tool?)"),
        'on = "tool"\nwhen = "tool.contians(1)"\ndecision = "deny"': (10, "unknown function 'contians'"),
        'on = "tool"\nwhen = "true"\ndecision = "redact"\npattern = "(["': (12, "not a regular expression"),
        'on = "tool"\nwhen = "true"\ndecision = "redact"': (7, "needs fields"),
        'on = "tool"\nwhen = "true"\ndecison = "deny"': (11, "did you mean decision?"),
    }
    ok = '[[rule]]\nname = "fine"\non = "tool"\nwhen = "true"\ndecision = "allow"\n\n'
    for body, (line, reason) in cases.items():
        path = tmp_path / "rules.toml"
        path.write_text(ok + f'[[rule]]\nname = "bad"\n{body}\n')
        with pytest.raises(ConfigError) as exc:
            rules.load(path)
        text = str(exc.value)
        assert text.startswith(f"{path}:{line}: rule 2 ('bad'): ") and reason in text, text
    path.write_text("[[rule]\n")
    with pytest.raises(ConfigError, match=r"not valid TOML.*line 1"):
        rules.load(path)
    with pytest.raises(ConfigError, match="MESH_POLICY_FILE"):
        Settings.load(environ={"MESH_POLICY_FILE": str(tmp_path / "missing.toml")})
    assert len(rules.load(EXAMPLES).rules) == 6  # the shipped examples load


async def test_mesh_run_stops_on_a_bad_rule_file_with_exit_code_2(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[rule]]\nname = "bad"\non = "tool"\nwhen = "args.amount >"\ndecision = "deny"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml:4: rule 1 \('bad'\): the condition does not parse"):
        AgentRuntime(agent, settings.model_copy(update={"policy_file": path}), None)  # type: ignore[arg-type]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(
        {
            "MESH_NATS_URL": settings.nats_url or "",
            "MESH_DATA_DIR": str(settings.data_dir),
            "MESH_POLICY_FILE": str(path),
            "PYTHONPATH": str(TESTS),
        }
    )
    argv = [sys.executable, "-m", "mesh", "run", "mesh_user_tools:agent"]
    done = await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"{path}:4: rule 1 ('bad'): the condition does not parse" in done.stderr


async def test_a_denied_outgoing_message_dead_letters_the_handling_with_the_rule(
    client: MeshClient, settings: Settings
) -> None:
    conv = "policy-deny-message"
    governed = _with_rules(
        settings,
        """
[[rule]]
name = "no-legal-hold-orders-out"
on = "message"
when = 'type == "test.answered" && body.text.contains("A-66")'
decision = "deny"
reason = "A-66 is under legal hold"
""",
    )
    rec = await Recorder.start(client.transport, f"mesh.{conv}.>")
    async with running_agent(agent, governed):
        await client.send("clerk", Ask(text='call lookup_order({"order_id": "A-66"})'), conversation=conv)
        msgs = await rec.wait_for(lambda ms: any(m.subject.endswith("dlq.clerk") for m in ms), timeout=30)
    [dead] = [m for m in msgs if m.subject.endswith("dlq.clerk")]
    assert dead.headers[h.DLQ_KIND] == "policy_denied"
    assert "'no-legal-hold-orders-out'" in dead.headers[h.DLQ_REASON]
    assert "A-66 is under legal hold" in dead.headers[h.DLQ_REASON]
    assert not [m for m in msgs if m.subject.endswith("test.answered")]  # it never went out
    [record] = await _policy_records(client, conv)
    assert record.detail["rule"] == "no-legal-hold-orders-out" and record.detail["on"] == "message"


async def test_the_example_rule_keeps_other_customers_out_of_a_reply() -> None:
    """`no-other-customers-in-a-reply` of policies/examples.toml, on the writer's outgoing
    reply, while it handles the findings of a ticket of customer C-1."""
    policy = Policy(rules.load(EXAMPLES), "writer")
    received = {"request": {"ticket": {"customer": "C-1"}}}
    ctx = SimpleNamespace(
        envelope=SimpleNamespace(data=msgspec.json.encode(received), content_type=JSON, type_name="x"),
        sender="research",
        conversation_id="c",
        audit=None,
        trace_id="",
    )
    sent: list[Outgoing] = []

    async def deliver(out: Outgoing) -> None:
        sent.append(out)

    send = policy.outgoing(deliver)

    def reply(text: str) -> Outgoing:
        body = msgspec.json.encode({"ticket_id": "T-1", "reply": text})
        return Outgoing("mesh.c.evt.support.reply_drafted", body, {h.TYPE: "support.reply_drafted"}, "store")

    token = policy_module._current.set((policy, policy_module.Handling(ctx)))  # type: ignore[arg-type]
    try:
        await send(reply("Dear C-1, your refund is on its way."))
        with pytest.raises(PolicyDenied, match="no-other-customers-in-a-reply"):
            await send(reply("Dear C-1, like C-2 you will be refunded."))
        await send(reply("Card 4111 1111 1111 1111 was refunded."))
    finally:
        policy_module._current.reset(token)
    assert [msgspec.json.decode(o.data)["reply"] for o in sent] == [
        "Dear C-1, your refund is on its way.",
        "Card [redacted] was refunded.",
    ]
