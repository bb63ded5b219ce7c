"""`mesh demo` end to end: three agent processes, an embedded server, one trace."""

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
        "triage → research",
        "research → writer",
        "writer → evt:support.reply_drafted",
    ):
        assert out.count(who) >= 4, who  # live line + tree line, per ticket
    for trace_id in trees:
        assert (
            f"trace {trace_id}: 8 spans from 5 processes (helpdesk, memory, research, triage, writer)" in out
        )
    assert "reply drafted (billing, high, model offline" in out
    assert "reply drafted (bug, urgent, model offline" in out
    # the server it started is gone, and later commands are told so
    assert not (tmp_path / "server" / "server.json").exists()
