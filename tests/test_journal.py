"""The journal: a redelivered message gets its model replies and tool results again instead
of calling the model or running the tool again, on the same replica or another, and a
journal that cannot be used costs the saving, never the handler.

Model calls are counted by the model itself (in this process, or an HTTP server speaking
the chat completions API for agent processes); tool runs by the tool."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from conftest import SAMPLES
from llm_servers import ChatCompletionsAPI, Script, serve
from mesh_user_tools import REFUNDS, Answered, Ask
from mesh_user_tools import agent as clerk
from sample_agents.journaled import Asked, Done, Task

from mesh import Agent, Context, Message, message
from mesh.cli.llm import decide
from mesh.llm import OfflineLLM, Reply, Request, Router, Text, journal
from mesh.llm.journal import Journal, Journaled, ModelEntry, ToolEntry, journal_key, recorded
from mesh.llm.streaming import LLMChunk, LLMFinal
from mesh.patterns.approval import ApprovalRequest, approval_key, decoded
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import Recorder, running_agent, secure_nats_server, spawn_agent
from mesh.transport import streams
from mesh.transport.identities import with_role
from mesh.transport.state import MemoryState, StateStore
from mesh.wire.codec import default_codec
from mesh.wire.settings import Settings

REFUND = 'Please call refund({"order_id": "A-9", "amount_eur": 20})'


class Counting(OfflineLLM):
    """The offline model, counting its calls by the prompt's text and numbering its text
    answers, so an answer given again can be told from one asked again."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def chat(self, request: Request) -> Reply:
        prompt = request.messages[0].text
        self.calls[prompt] += 1
        reply = await super().chat(request)
        if reply.tool_calls:
            return reply
        return Reply(
            content=[Text(f"{reply.text} #{self.calls[prompt]}")],
            usage=reply.usage,
            model=reply.model,
            provider=reply.provider,
        )


@message("test.jtask", version=1)
class JTask(Message):
    prompt: str
    fail_first: bool = True  # raise on the first delivery, after the model calls
    second: bool = True  # a second model call, after the failure point


@message("test.jdone", version=1)
class JDone(Message):
    texts: list[str]
    attempt: int


async def _answer(rec: Recorder, n: int = 1) -> list[JDone]:
    return [default_codec.decode(m.data, JDone) for m in await rec.wait_count(n, timeout=20)]


async def _journal(operator: MeshClient, settings: Settings) -> StateStore:
    """The journal's bucket, as the operator reads it."""
    _, _, _, spec = streams.bucket_specs(settings)
    return await operator.transport.state(spec, settings)


def _agent(name: str) -> Agent:
    agent = Agent(name, description="Asks the model, fails once after asking, asks again")

    @agent.handler
    async def on_task(task: JTask, ctx: Context) -> JDone:
        texts = [await ctx.llm.complete(system="Be brief.", prompt=task.prompt)]
        if task.fail_first and ctx.attempt == 1:
            raise RuntimeError("failed after the model answered")
        if task.second:
            texts.append(await ctx.llm.complete(system="Be brief.", prompt=task.prompt + " again"))
        return JDone(texts=texts, attempt=ctx.attempt)

    return agent


async def test_a_retried_handler_gets_its_model_reply_again_and_calls_past_it_run_live(
    client: MeshClient, operator: MeshClient, settings: Settings
) -> None:
    """The first delivery asks the model and raises; the retry is answered from the journal
    for that call and asks the model live for the next one, which is journaled in turn."""
    model = Counting()
    conv = f"journal-retry-{uuid.uuid4().hex[:8]}"
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.jdone")
    async with running_agent(_agent("jretry"), settings, llm=model):
        sent = await client.send("jretry", JTask(prompt="first question"), conversation=conv)
        [done] = await _answer(rec)
    assert done.attempt == 2
    assert model.calls == {"first question": 1, "first question again": 1}
    assert done.texts == ["first question #1", "first question again #1"]
    entries = await recorded(await _journal(operator, settings), "jretry", sent.id)
    assert [e.reply.text for e in entries.model] == done.texts
    assert entries.tools == []


async def test_different_messages_do_not_share_journal_entries(
    client: MeshClient, operator: MeshClient, settings: Settings
) -> None:
    """Two messages with the same prompt each pay for their own call (their ids differ, one
    of them is no safe KV token); a message that never failed is journaled all the same."""
    model = Counting()
    conv = f"journal-apart-{uuid.uuid4().hex[:8]}"
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.jdone")
    async with running_agent(_agent("japart"), settings, llm=model):
        await client.send("japart", JTask(prompt="same", second=False), conversation=conv, msg_id="task 1: a")
        [first] = await _answer(rec)
        await client.send("japart", JTask(prompt="same", fail_first=False, second=False), conversation=conv)
        [_, second] = await _answer(rec, 2)
    assert model.calls == {"same": 2}
    assert (first.texts, first.attempt) == (["same #1"], 2)
    assert (second.texts, second.attempt) == (["same #2"], 1)
    journal = await _journal(operator, settings)
    assert [e.reply.text for e in (await recorded(journal, "japart", "task 1: a")).model] == ["same #1"]
    assert journal_key("japart", "task 1: a", "llm", 0).startswith("japart.=")  # hashed, one token


async def test_a_journaled_call_that_asks_something_else_this_time_is_made_live() -> None:
    """A handler that asks another question at the same call number (its prompt depends on
    the time, say) is not given the answer to the old one."""
    model = Counting()
    journal = Journaled(model)
    book = Journal("asker", MemoryState())
    asked: list[str] = []

    async def handler(ctx: Any, prompt: Any) -> None:
        asked.append(await journal.complete(system="", prompt=prompt))

    run: Any = book.scope(handler)
    ctx = SimpleNamespace(agent="asker", message_id="m1")  # a handling of message m1, three times
    for prompt in ("old question", "old question", "new question"):
        await run(ctx, prompt)
    assert asked == ["old question #1", "old question #1", "new question #1"]
    assert model.calls == {"old question": 1, "new question": 1}


@message("test.jtools", version=1)
class ToolTask(Message):
    key: str


class RunKey(msgspec.Struct):
    key: str


RUNS: Counter[str] = Counter()
tooled = Agent("jtools", description="Lets the model run a counting tool, fails once after it")


@tooled.tool(timeout=5)
async def count_run(args: RunKey) -> str:
    """Count a run of this tool for a key, and say how many there were."""
    RUNS[args.key] += 1
    return f"run {RUNS[args.key]} for {args.key}"


@tooled.handler
async def on_tools(task: ToolTask, ctx: Context) -> JDone:
    run = await ctx.run_tools(system="Use the tools.", prompt=f'call count_run({{"key": "{task.key}"}})')
    if ctx.attempt == 1:
        raise RuntimeError("failed after the tool ran")
    return JDone(texts=[run.text, *(c.output for c in run.calls)], attempt=ctx.attempt)


async def test_a_tool_result_is_journaled_and_the_tool_runs_once_across_a_redelivery(
    client: MeshClient, operator: MeshClient, settings: Settings
) -> None:
    model = Counting()
    key = uuid.uuid4().hex[:8]
    conv = f"journal-tools-{key}"
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.jdone")
    async with running_agent(tooled, settings, llm=model):
        sent = await client.send("jtools", ToolTask(key=key), conversation=conv)
        [done] = await _answer(rec)
    assert RUNS[key] == 1
    assert done.attempt == 2
    assert done.texts[1] == f"run 1 for {key}"
    assert sum(model.calls.values()) == 2  # the turn that called the tool, the one that answered
    entries = await recorded(await _journal(operator, settings), "jtools", sent.id)
    assert [type(e) for e in entries.model] == [ModelEntry, ModelEntry]
    assert entries.tools == [
        ToolEntry(asked=entries.tools[0].asked, tool="count_run", output=f"run 1 for {key}")
    ]


streamer = Agent("jstream", description="Streams the model's answer, fails once after it")


@streamer.handler
async def on_stream(task: JTask, ctx: Context) -> JDone:
    text = await ctx.stream(system="Be brief.", prompt=task.prompt)
    if ctx.attempt == 1:
        raise RuntimeError("failed after the answer streamed")
    return JDone(texts=[text], attempt=ctx.attempt)


async def test_a_streamed_answer_given_again_is_published_again_and_metered_as_replayed(
    client: MeshClient, settings: Settings
) -> None:
    """On the retry the model is not called: the recorded answer is published as one chunk
    and the final, and the router's ledger counts one paid call and one replayed."""
    model = Counting()
    router = Router([model])
    conv = f"journal-stream-{uuid.uuid4().hex[:8]}"
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.jdone")
    chunks = await Recorder.start(client.transport, f"mesh.{conv}.live.llm.chunk")
    finals = await Recorder.start(client.transport, f"mesh.{conv}.evt.llm.final")
    async with running_agent(streamer, settings, llm=router):
        await client.send("jstream", JTask(prompt="stream this answer please"), conversation=conv)
        [done] = await _answer(rec)
        await finals.wait_count(2)
    assert model.calls == {"stream this answer please": 1}
    [text] = done.texts
    pieces = [default_codec.decode(m.data, LLMChunk) for m in chunks.messages]
    first = [c for c in pieces if c is not pieces[-1]]
    assert len(first) > 1 and "".join(c.text for c in first) == text  # streamed live, word by word
    assert (pieces[-1].seq, pieces[-1].text, pieces[-1].stream) == (0, text, first[0].stream)  # again
    assert [default_codec.decode(m.data, LLMFinal).text for m in finals.messages] == [text, text]
    totals = router.metering.ledger.agents["jstream"]
    assert (totals.calls, totals.replayed) == (1, 1)


async def test_a_parked_call_and_its_resumed_run_each_keep_their_own_journal(
    operator: MeshClient, settings: Settings
) -> None:
    """The run that parks an approval journals the model turn that asked for the tool; the
    resumed run is another message, with a journal of its own: the approved tool runs once,
    the model is asked once per turn."""
    model = Counting()
    conv = f"journal-approval-{uuid.uuid4().hex[:8]}"
    REFUNDS.clear()
    rec = await Recorder.start(operator.transport, f"mesh.{conv}.evt.>")
    async with running_agent(clerk, settings, llm=model):
        sent = await operator.send("clerk", Ask(text=REFUND), conversation=conv)
        [req] = await rec.wait_for(lambda ms: any(m.subject.endswith("approval.request") for m in ms))
        approval_id = default_codec.decode(req.data, ApprovalRequest).approval
        await decide(operator, settings, approval_id, approved=True, by="ada", reason="ok")
        msgs = await rec.wait_for(lambda ms: any(m.subject.endswith("test.answered") for m in ms))
    [answer] = [default_codec.decode(m.data, Answered) for m in msgs if m.subject.endswith("test.answered")]
    assert answer.calls == ["refund"] and len(REFUNDS) == 1
    assert sum(model.calls.values()) == 2  # the turn that asked for the refund, the answer
    _, state_spec, _, _ = streams.bucket_specs(settings)
    state = await operator.transport.state(state_spec, settings)
    got = await state.get(approval_key("clerk", approval_id))
    assert got is not None
    resumed_id = decoded(got[0]).resume_id
    store = await _journal(operator, settings)
    parked, resumed = await recorded(store, "clerk", sent.id), await recorded(store, "clerk", resumed_id)
    assert [e.reply.tool_calls[0].name for e in parked.model] == ["refund"] and parked.tools == []
    assert [e.reply.text for e in resumed.model] == [answer.text] and resumed.tools == []


class Warnings:
    """Stands in for the journal's structlog logger (whose configuration other tests change)."""

    def __init__(self) -> None:
        self.said: list[str] = []

    def warning(self, event: str, **fields: object) -> None:
        self.said.append(event)


async def test_a_journal_that_cannot_be_used_does_not_fail_the_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator deletes the journal's bucket under a running agent: every read and write
    of the journal fails. The handler still answers (the model is called live each time)."""
    model = Counting()
    logged = Warnings()
    monkeypatch.setattr(journal, "log", logged)
    with secure_nats_server(tmp_path / "nats") as mesh:
        await mesh.prepare()
        settings = mesh.local(
            Settings.load(
                environ={},
                data_dir=tmp_path / "data",
                trace_exporter="none",
                log_level="warning",
                retry_backoff=0.05,
                retry_backoff_max=0.2,
            )
        )
        client = await MeshClient.connect(with_role(settings, "publisher"), "journal-lost")
        operator = await MeshClient.connect(with_role(settings, "operator"), "journal-breaker")
        try:
            rec = await Recorder.start(client.transport, "mesh.journal-lost.evt.test.jdone")
            async with running_agent(_agent("jlost"), settings, llm=model):
                await operator.transport._js.delete_key_value(streams.JOURNAL)  # type: ignore[attr-defined]
                await client.send("jlost", JTask(prompt="lost", second=False), conversation="journal-lost")
                [done] = await _answer(rec)
        finally:
            await client.close()
            await operator.close()
    assert done.attempt == 2
    assert done.texts == ["lost #2"]  # asked again: nothing could be recorded
    assert model.calls == {"lost": 2}
    assert logged.said.count("journal not readable: calling live") == 2
    assert logged.said.count("journal not writable: call not recorded") == 2


# -- agent processes: kill -9 after the model answered, a replica takes the redelivery ----


@pytest.mark.slow
async def test_a_replica_taking_a_killed_handlers_message_does_not_call_the_model_again(
    client: MeshClient, settings: Settings, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    script = Script()
    with serve(ChatCompletionsAPI, script) as url:
        env = {
            "MESH_LLM": "openai",
            "MESH_OPENAI_BASE_URL": url + "/v1",
            "MESH_ACK_WAIT": "2",  # the killed handler's message comes again 2 s later
            "MESH_LOG_LEVEL": "warning",
        }
        for i in range(2):
            procs.append(
                spawn_agent(
                    f"{SAMPLES / 'journaled.py'}:agent", settings, log=tmp_path / f"j{i}.log", env=env
                )
            )
        await wait_for_agents(client.transport, {"journaled": 2}, timeout=30)
        conv = f"journal-kill-{uuid.uuid4().hex[:8]}"
        asked = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.journal_asked")
        done = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.journal_done")
        gate = tmp_path / "gate"
        prompt = f"what is {conv}?"
        await client.send("journaled", Task(prompt=prompt, gate=str(gate)), conversation=conv)
        [first] = [default_codec.decode(m.data, Asked) for m in await asked.wait_count(1, timeout=30)]
        [victim] = [p for p in procs if p.pid == first.pid]
        victim.send_signal(signal.SIGKILL)
        await asyncio.to_thread(victim.wait, 10)
        gate.touch()
        [result] = [default_codec.decode(m.data, Done) for m in await done.wait_count(1, timeout=60)]
        requests = len(script.requests)
    print(f"model requests: {requests}; asked by pid {first.pid}, answered by pid {result.pid}")
    assert result.pid != first.pid and result.pid in {p.pid for p in procs}
    assert requests == 1
    assert result.text == first.text == f"echo: {prompt}"
