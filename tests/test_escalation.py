"""Escalation (mesh.patterns.escalation): work that fails its last retry goes to a fallback
agent, or waits for a person in `mesh escalations` and resumes when they retry it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import mesh_cli

from mesh import HUMAN, Agent, Context, Message, message
from mesh.patterns.escalation import ESCALATED_FROM, ESCALATION, EscalationRequest, EscalationResolved
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.errors import RegistrationError
from mesh.wire.settings import Settings


@message("test.chore")
class Chore(Message, frozen=True):
    name: str


@message("test.chore_done")
class ChoreDone(Message, frozen=True):
    name: str
    by: str
    note: str = ""


def _quick(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_deliver": 2, "retry_backoff": 0.05})


async def test_a_message_that_fails_its_last_retry_goes_to_the_fallback_agent(
    settings: Settings, operator: MeshClient
) -> None:
    flaky = Agent("flaky", description="always fails", escalate="rescuer")
    rescuer = Agent("rescuer", description="does what flaky could not")
    seen: list[dict[str, str]] = []

    @flaky.handler(events=False)
    async def fail(chore: Chore) -> None:
        raise RuntimeError(f"cannot do {chore.name}")

    @rescuer.handler(events=False)
    async def rescue(chore: Chore, ctx: Context) -> ChoreDone:
        seen.append(dict(ctx.envelope.headers))
        return ChoreDone(name=chore.name, by="rescuer")

    done = await Recorder.start(operator.transport, "mesh.esc-1.evt.test.chore_done")
    dlq = await Recorder.start(operator.transport, "mesh.esc-1.dlq.>")
    async with running_agent(flaky, _quick(settings)) as f, running_agent(rescuer, _quick(settings)):
        await operator.send("flaky", Chore(name="dishes"), conversation="esc-1")
        [m] = await done.wait_count(1, timeout=20)
        assert f.stats.escalated == 1
        listed = await mesh_cli(settings, "agents", "--json")  # and `mesh agents` counts it
        rows = [json.loads(line) for line in listed.stdout.splitlines()]
        assert next(r for r in rows if r["name"] == "flaky")["stats"]["escalated"] == 1
    assert default_codec.decode(m.data, ChoreDone).by == "rescuer"
    assert seen[0][ESCALATED_FROM] == "flaky" and "cannot do dishes (delivery 2)" in seen[0][ESCALATION]
    assert seen[0][h.SENDER] == "flaky"  # flaky hands it on, signed as itself
    await asyncio.sleep(0.3)
    assert dlq.messages == []  # escalated, not dead-lettered


async def test_a_person_sees_the_escalation_retries_it_after_a_fix_and_it_resumes(
    settings: Settings, operator: MeshClient, tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"
    fickle = Agent("fickle", description="works once someone fixes it")

    @fickle.handler(events=False, escalate=HUMAN)
    async def work(chore: Chore) -> ChoreDone:
        if not fixed.exists() or chore.name == "impossible":
            raise RuntimeError("the printer is on fire")
        return ChoreDone(name=chore.name, by="fickle", note="after the fix")

    events = await Recorder.start(operator.transport, "mesh.esc-2.evt.>")

    def requests(ms: list[Any]) -> list[EscalationRequest]:
        return [default_codec.decode(m.data, EscalationRequest) for m in ms if m.subject.endswith(".request")]

    async with running_agent(fickle, _quick(settings)):
        await operator.send("fickle", Chore(name="print"), conversation="esc-2")
        [asked] = requests(await events.wait_for(lambda ms: len(requests(ms)) == 1))
        listed = await mesh_cli(settings, "escalations", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["id"]: r for r in map(json.loads, listed.stdout.splitlines())}
        row = rows[asked.escalation]
        assert (row["agent"], row["type"], row["conversation"]) == ("fickle", "test.chore", "esc-2")
        assert "the printer is on fire" in row["reason"]
        await asyncio.to_thread(fixed.write_text, "")  # a person fixes the cause, then retries
        retried = await mesh_cli(settings, "escalations", "retry", asked.escalation, "--reason", "put it out")
        assert retried.returncode == 0, retried.stderr
        await events.wait_for(lambda ms: any(m.subject.endswith("test.chore_done") for m in ms))
        again = await mesh_cli(settings, "escalations", "retry", asked.escalation)
        assert again.returncode == 2 and "no escalation" in again.stderr
        # one that cannot be done is dropped
        await operator.send("fickle", Chore(name="impossible"), conversation="esc-2")
        second = requests(await events.wait_for(lambda ms: len(requests(ms)) == 2))[1]
        dropped = await mesh_cli(
            settings, "escalations", "drop", second.escalation, "--reason", "cannot be done"
        )
        assert dropped.returncode == 0, dropped.stderr
        msgs = await events.wait_for(lambda ms: len([m for m in ms if m.subject.endswith(".resolved")]) == 2)
    [done] = [default_codec.decode(m.data, ChoreDone) for m in msgs if m.subject.endswith("test.chore_done")]
    assert done.note == "after the fix" and done.name == "print"
    resolved = [
        default_codec.decode(m.data, EscalationResolved) for m in msgs if m.subject.endswith("resolved")
    ]
    assert [(r.status, r.reason) for r in resolved] == [
        ("retried", "put it out"),
        ("dropped", "cannot be done"),
    ]
    listed = await mesh_cli(settings, "escalations", "--json")
    assert not [r for r in map(json.loads, listed.stdout.splitlines()) if r["agent"] == "fickle"]


def test_an_escalation_must_name_an_agent_or_people() -> None:
    with pytest.raises(RegistrationError, match=r"neither an agent's name nor mesh\.HUMAN"):
        Agent("x", escalate="Not A Name")
    with pytest.raises(RegistrationError, match="escalate to itself"):
        Agent("loop", escalate="loop")
