"""Looking back at a whole conversation: a fan-out, a redelivered branch and an approval
decided with `mesh approve`, recorded whole, listed by `mesh conversations`, shown by
`mesh show`, replayed by `mesh tap --from-start`, and one trace throughout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from conftest import mesh_cli
from mesh_user_tools import REFUNDS
from mesh_user_tools import agent as clerk
from sample_agents.checker_v2 import checker as checker_v2
from sample_agents.lookback import Case, checker, planner

from mesh.llm.offline import OfflineLLM
from mesh.llm.types import Reply, Request
from mesh.observability import history
from mesh.observability import record as rec
from mesh.runtime.client import MeshClient
from mesh.testing import replay_file, running_agent
from mesh.wire import subjects
from mesh.wire.settings import Settings

CONV = "lookback-1"


class Counting(OfflineLLM):
    """The offline model, counting the calls that reach it."""

    calls = 0

    async def chat(self, request: Request) -> Reply:
        self.calls += 1
        return await super().chat(request)


async def _waiting(settings: Settings, agent: str) -> int:
    """The WAITING of `agent` in `mesh agents --json`."""
    listed = await mesh_cli(settings, "agents", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    return int(next(r["waiting"] for r in rows if r["name"] == agent))


async def _until(settings: Settings, client: MeshClient, status: str) -> list[history.Recorded]:
    msgs: list[history.Recorded] = []
    for _ in range(300):
        msgs = await history.conversation(client.transport, CONV)
        if msgs and history.summarize(CONV, msgs).status == status:
            return msgs
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {status}: {[(m.type, m.deliveries) for m in msgs]}")


async def test_a_conversation_with_a_fan_out_a_redelivery_and_an_approval_is_recorded_whole(
    settings: Settings, client: MeshClient, tmp_path: Path
) -> None:
    REFUNDS.clear()
    quick = settings.model_copy(update={"retry_backoff": 0.05})
    async with running_agent(planner, quick), running_agent(checker, quick), running_agent(clerk, quick):
        before = await _waiting(settings, "clerk")  # other tests' calls may wait on this server
        await client.send("planner", Case(order="B-7"), conversation=CONV)
        waiting = await _until(settings, client, history.WAITING)
        # while it waits: listed as waiting, and `mesh agents` counts the clerk's parked call
        listed = await mesh_cli(settings, "conversations", "--status", "waiting", "--json")
        assert listed.returncode == 0, listed.stderr
        assert CONV in [json.loads(line)["id"] for line in listed.stdout.splitlines()]
        assert await _waiting(settings, "clerk") == before + 1  # `mesh agents` counts the parked call
        [ask] = [m for m in waiting if m.type == "approval.request"]
        approval = ask.body()["approval"]
        approved = await mesh_cli(settings, "approve", approval, "--by", "ada")
        assert approved.returncode == 0, approved.stderr
        msgs = await _until(settings, client, history.DONE)
        assert any(m.type == "test.answered" for m in msgs)
    assert REFUNDS and REFUNDS[0].order_id == "B-7"

    # recorded whole: every message an agent was sent has a final outcome, each once
    assert len({m.id for m in msgs}) == len(msgs)
    types = [m.type for m in msgs]
    for expected in ("test.case", "test.check", "test.checked", "test.ask", "approval.request"):
        assert expected in types, types
    assert {"approval.decision", "approval.resolved", "test.answered"} <= set(types)
    for m in msgs:
        if m.kind in (subjects.AGENT, subjects.DIRECT):
            assert any(d.outcome == rec.HANDLED for d in m.deliveries), (m.type, m.deliveries)
    # the redelivery: the failed first delivery and the handled second one
    [failing] = [m for m in msgs if m.type == "test.check" and m.body()["n"] == 1]
    assert [(d.outcome, d.attempt) for d in failing.deliveries] == [(rec.RETRY, 1), (rec.HANDLED, 2)]
    assert "timed out" in failing.deliveries[0].reason
    # one trace, the decision by `mesh approve` included (the first message came from outside any)
    traced = {m.trace_id for m in msgs if m.trace_id}
    assert len(traced) == 1 and all(m.trace_id for m in msgs if m.type != "test.case")
    summary = history.summarize(CONV, msgs)
    assert summary.status == history.DONE and summary.input_tokens > 0
    assert {"planner", "checker", "clerk"} <= set(summary.agents)

    # `mesh show`: the causal tree, the outcomes, the bodies and the trace id
    shown = await mesh_cli(settings, "show", CONV)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"conversation {CONV}  done" in out and f"trace: {traced.pop()}" in out
    assert "checker: retry (delivery 1" in out and "checker: handled (delivery 2" in out
    assert "planner → checker  [test.check]" in out and '"order": "B-7"' in out
    case_line = next(i for i, line in enumerate(out.splitlines()) if "[test.case]" in line)
    check_line = next(i for i, line in enumerate(out.splitlines()) if "[test.check]" in line)
    assert case_line < check_line  # a cause before what it caused
    as_json = json.loads((await mesh_cli(settings, "show", CONV, "--json")).stdout)
    assert as_json["status"] == "done" and len(as_json["messages"]) == len(msgs)

    # `mesh tap -c --from-start`: the history first (the conversation is over: nothing live)
    tapped = await mesh_cli(settings, "tap", "-c", CONV, "--from-start", "--json", "--timeout", "1")
    assert tapped.returncode == 0, tapped.stderr
    seen = [json.loads(line) for line in tapped.stdout.splitlines()]
    assert sorted(line["id"] for line in seen) == sorted(m.id for m in msgs)
    missing = await mesh_cli(settings, "tap", "--from-start")
    assert missing.returncode != 0 and "-c <conversation-id>" in missing.stderr
    unknown = await mesh_cli(settings, "show", "no-such-conversation")
    assert unknown.returncode != 0 and "mesh conversations" in unknown.stderr

    # replayed as a regression test: the same agents send the same; a changed one is reported
    exported = await mesh_cli(settings, "record", CONV, "--export", str(tmp_path))
    assert exported.returncode == 0, exported.stderr
    recording = tmp_path / f"{CONV}.json"
    same = await mesh_cli(
        settings,
        "replay",
        str(recording),
        "--agent",
        "planner=sample_agents.lookback:planner",
        "--agent",
        "checker=sample_agents.lookback:checker",
    )
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no differences" in same.stdout
    changed = await mesh_cli(settings, "replay", CONV, "--agent", "checker=sample_agents.checker_v2:checker")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert changed.stdout.count("~ checker test.checked") == 2 and "ok: true → false" in changed.stdout
    # the clerk: its model answers from the journal (no call), the approval decided again from the record
    counting = Counting()
    report = await replay_file(recording, {"clerk": clerk}, llm=counting)
    report.assert_same()
    assert report.inputs == 2 and report.recorded == report.replayed and counting.calls == 0
    assert json.loads(recording.read_text())["journal"]  # exported with the journaled results
    live = await replay_file(recording, {"clerk": clerk}, llm=counting, live_model=True)
    assert counting.calls > 0 and any("live" in n for n in live.notes)
    with pytest.raises(AssertionError, match="ok: true → false"):
        (await replay_file(recording, {"checker": checker_v2})).assert_same()
