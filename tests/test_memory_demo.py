"""`mesh demo` with the memory service: research recalls an earlier ticket in a later
conversation, and the memory hops are in the trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_research_recalls_an_earlier_ticket_across_conversations(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "ANTHROPIC_", "OTEL_"))}
    env["MESH_DATA_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "demo", "--tickets", "4"],  # the 4th is T-1001 again
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr + out
    assert out.count("research → memory!  [memory.recall]") == 4  # in each causal tree
    assert out.count("research → memory!  [memory.remember]") == 4
    assert out.count("sources ['kb-101', 'kb-102', 'T-0817', 'memory']") == 1  # only the repeated ticket
    assert "Earlier: Ticket T-1001 (billing) 'Charged twice for my subscription':" in out
    assert out.count("spans from 6 processes (helpdesk, memory, policy, research, triage, writer)") == 4
    assert (tmp_path / "memory" / "mesh_memory" / "mesh-memory.json").exists()  # the embedded engine
