"""Cancellation (mesh.runtime.cancel): `mesh cancel` stops a conversation's running handler in
another process (its slow tool, its slow model call), and what still arrives for it is
refused; a deadline passing ends a running handler the same way."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SAMPLES, mesh_cli
from llm_servers import ChatCompletionsAPI, Script, serve
from sample_agents.slowpoke import SlowTask

from mesh import Agent, Context
from mesh.runtime.client import Lineage, MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import Recorder, running_agent, spawn_agent, stop_process
from mesh.wire import envelope as h
from mesh.wire.errors import RequestFailed
from mesh.wire.settings import Settings

SLOWPOKE = f"{SAMPLES / 'slowpoke.py'}:agent"


async def _appears(path: Path, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        if await asyncio.to_thread(path.exists):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path.name} never appeared")


@pytest.fixture
def model_url() -> Iterator[str]:
    """A model that never answers (held until the test ends)."""
    script = Script(steps=["slow"] * 10)
    with serve(ChatCompletionsAPI, script) as url:
        yield url


@pytest.mark.parametrize("mode", ["tool", "model"])
async def test_mesh_cancel_stops_a_slow_tool_or_model_call_in_another_process(
    settings: Settings, operator: MeshClient, tmp_path: Path, model_url: str, mode: str
) -> None:
    conv = f"cancel-{mode}"
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {"SLOWPOKE_DIR": str(marks)}
    if mode == "model":
        env.update({"MESH_LLM": "openai", "MESH_OPENAI_BASE_URL": model_url, "MESH_LLM_TIMEOUT": "120"})
    proc = spawn_agent(SLOWPOKE, settings, log=tmp_path / "slowpoke.log", env=env)
    try:
        await wait_for_agents(operator.transport, {"slowpoke": 1}, timeout=60)
        dlq = await Recorder.start(operator.transport, f"mesh.{conv}.dlq.slowpoke")
        await operator.send("slowpoke", SlowTask(n=1, mode=mode), conversation=conv)
        await _appears(marks / "started-1")
        done = await mesh_cli(settings, "cancel", conv, "--reason", "the customer hung up")
        assert done.returncode == 0, done.stderr
        assert "1 running handler(s) stopped" in done.stdout and "slowpoke" in done.stdout
        [letter] = await dlq.wait_count(1, timeout=30)
        assert letter.headers[h.DLQ_KIND] == "cancelled"
        assert "the customer hung up" in letter.headers[h.DLQ_REASON]
        if mode == "tool":
            await _appears(marks / "tool-cancelled-1")  # the tool's wait was cut short
        # what still arrives for the conversation is refused, not handled
        await operator.send("slowpoke", SlowTask(n=2, mode=mode), conversation=conv)
        letters = await dlq.wait_count(2, timeout=30)
        assert [m.headers[h.DLQ_KIND] for m in letters] == ["cancelled", "cancelled"]
        assert not (marks / "started-2").exists() and not (marks / "finished-1").exists()
    finally:
        stop_process(proc)


lingerer = Agent("lingerer", description="takes longer than its caller's deadline")


@lingerer.handler(events=False)
async def linger(task: SlowTask, ctx: Context) -> SlowTask:
    await asyncio.sleep(30)
    return task


async def test_a_deadline_passing_ends_a_running_handler(settings: Settings, operator: MeshClient) -> None:
    quick = settings.model_copy(update={"handler_timeout": 120.0})
    async with running_agent(lingerer, quick):
        dlq = await Recorder.start(operator.transport, "mesh.deadline-1.dlq.lingerer")
        await operator.send("lingerer", SlowTask(n=1, mode="x"), conversation="deadline-1", deadline=0.5)
        [letter] = await dlq.wait_count(1, timeout=20)  # long before the handler's 30 s
        assert letter.headers[h.DLQ_KIND] == "deadline_exceeded"
        # a request: the requester is told, not left waiting past its timeout
        soon = Lineage(deadline_ms=int(time.time() * 1000) + 500)
        with pytest.raises(RequestFailed) as failed:
            await operator.request(
                "lingerer",
                SlowTask(n=2, mode="x"),
                SlowTask,
                timeout=20,
                lineage=soon,
                conversation="deadline-2",
            )
        assert failed.value.kind == "deadline_exceeded"


counted = Agent("counted", description="counts what it handles")
COUNTED: list[int] = []


@counted.handler(events=False)
async def count_it(task: SlowTask) -> None:
    COUNTED.append(task.n)


async def test_a_replica_started_after_a_cancellation_refuses_the_conversation(
    settings: Settings, client: MeshClient, operator: MeshClient
) -> None:
    """The cancellation is kept (MESH_CANCELS): an agent process that starts later (a
    scale-out, a restart) reads it before it takes a message, and refuses the conversation."""
    from mesh.testing import provision
    from mesh.transport import streams
    from mesh.transport.identities import with_role
    from mesh.transport.nats import NatsTransport
    from mesh.wire import subjects

    COUNTED.clear()
    async with running_agent(counted, settings):  # declared: its inbox is kept while it is away
        pass
    done = await mesh_cli(settings, "cancel", "cancel-later", "--reason", "duplicate ticket", "--wait", "0.2")
    assert done.returncode == 0, done.stderr
    assert "none answered" in done.stdout  # no agent process ran: only the kept record will tell
    dlq = await Recorder.start(operator.transport, "mesh.cancel-later.dlq.counted")
    await client.send("counted", SlowTask(n=1, mode="x"), conversation="cancel-later")
    await client.send("counted", SlowTask(n=2, mode="x"), conversation="cancel-other")
    async with running_agent(counted, settings) as late:
        [letter] = await dlq.wait_count(1, timeout=20)
        for _ in range(200):
            if COUNTED:
                break
            await asyncio.sleep(0.05)
        assert "duplicate ticket" in (late.cancels.stopped("cancel-later") or "")
    assert letter.headers[h.DLQ_KIND] == "cancelled" and "duplicate ticket" in letter.headers[h.DLQ_REASON]
    assert COUNTED == [2]  # the other conversation's message was handled
    # kept once per conversation; only the roles may keep one, never an agent
    kept = await operator.transport.stored_many(
        streams.CANCELS, 1, subjects.cancelled_subject("cancel-later")
    )
    assert len(kept) == 1
    agent_settings = await provision(counted, settings)
    for who in (agent_settings, with_role(settings, "observer")):
        t = await NatsTransport.connect(who.model_copy(update={"publish_retry_timeout": 1.0}), "not-allowed")
        try:
            with pytest.raises(Exception, match=r"(?i)permission|refused"):
                await t.store(subjects.cancelled_subject("cancel-other"), b"{}")
        finally:
            await t.close()
