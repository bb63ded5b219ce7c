"""`mesh demo` end to end: six agent processes, an embedded server, one trace per ticket,
with a sequential, a parallel and a hierarchical handoff in each."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SPENT = re.compile(r"model calls used ([\d,]+) of its 20,000 tokens")


def test_demo_runs_the_support_desk_and_prints_the_causal_tree(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "ANTHROPIC_", "OTEL_"))}
    env["MESH_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "demo", "--tickets", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr + out
    assert "all agents joined the mesh" in out
    trees = re.findall(r"as a causal tree \(trace ([0-9a-f]{32})\)", out)
    assert len(trees) == 2
    for who in (
        "helpdesk → evt:support.ticket_opened",
        "triage → research",  # triage supervises: research and policy in parallel
        "triage → policy",
        "research → research",  # research fans out to its replicas, one per source
        "research → triage",  # the merged findings answer the supervisor's join
        "policy → triage",
        "triage → writer",  # the synthesis is handed on
        "writer → evt:support.reply_drafted",
    ):
        assert out.count(who) >= 4, who  # live line + tree line, per ticket
    assert out.count("(joins 3 answers)") >= 2  # research's join of its three sources, per ticket
    assert out.count("(joins 2 answers)") >= 2  # triage's join of research and policy
    summaries = re.findall(r"trace ([0-9a-f]{32}): (.*)", out)
    processes = "from 6 processes (helpdesk, memory, policy, research, triage, writer)"
    # 14 handler spans and a GenAI client span per model call (triage, writer); the billing
    # ticket adds the helpdesk's approval and the writer's resumed run with its model call
    for trace_id, spans in zip(trees, (20, 16), strict=True):
        assert (trace_id, f"{spans} spans {processes}") in summaries, (
            summaries,
            out[out.find(f"trace {trace_id}:") :][:2000],
        )
    assert "research join sources" in out and "triage join case" in out
    # the writer's tools: a refund needs approval, which the plain demo grants at once
    assert "writer → evt:approval.request" in out
    assert "wants to run issue_refund(" in out and "approved by helpdesk (auto-approved in the demo)" in out
    assert "tool: refund for T-1001 issued to Ada" in out
    assert out.count("(the answer was streamed in") == 2
    assert "reply drafted (billing, high, model offline" in out
    # the support desk's policy rules: the card number in T-1001 never leaves the agent that took it
    assert "policy: rule no-card-numbers-out redacted a card number in" in out
    assert "4111 1111 1111 1111" not in out and "4111" not in out
    # and its budget: each conversation's model calls are counted against it, shared by the agents
    spent = [int(n.replace(",", "")) for n in SPENT.findall(out)]
    assert len(spent) == 2 and all(n > 0 for n in spent)
    assert "reply drafted (bug, urgent, model offline" in out
    # the server it started is gone, and later commands are told so
    assert not (tmp_path / "server" / "server.json").exists()


def test_interactive_demo_asks_before_a_refund_and_a_denial_is_respected(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "ANTHROPIC_", "OTEL_"))}
    env["MESH_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "demo", "--tickets", "1", "--interactive"],
        env=env,
        input="n\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr + out
    assert "wants to run issue_refund(" in out and "Approve?" in out
    assert "denied by you" in out
    assert '"status":"denied"' in out  # approval.resolved, as the tap shows it
    assert "tool: refund" not in out  # the refund never ran
    assert "reply drafted (billing, high, model offline" in out
    # the support desk's policy rules: the card number in T-1001 never leaves the agent that took it
    assert "policy: rule no-card-numbers-out redacted a card number in" in out
    assert "4111 1111 1111 1111" not in out and "4111" not in out
    # and its budget: each conversation's model calls are counted against it, shared by the agents
    spent = [int(n.replace(",", "")) for n in SPENT.findall(out)]
    assert len(spent) == 1 and spent[0] > 0  # one ticket
