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
    for trace_id in trees:
        assert (
            trace_id,
            # 14 handler spans, and a GenAI client span for each model call (triage, writer)
            "16 spans from 6 processes (helpdesk, memory, policy, research, triage, writer)",
        ) in summaries, (
            summaries,
            out[out.find(f"trace {trace_id}:") :][:2000],
        )
        assert "research join sources" in out and "triage join case" in out
    assert "reply drafted (billing, high, model offline" in out
    assert "reply drafted (bug, urgent, model offline" in out
    # the server it started is gone, and later commands are told so
    assert not (tmp_path / "server" / "server.json").exists()
