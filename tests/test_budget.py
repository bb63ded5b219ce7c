"""Model budgets (mesh.llm.budget): counted in MESH_STATE across replicas with compare-and-set,
checked before each model call, and a spent one ends the work with a typed failure.

The model is an in-process one that says what each call used (30 tokens) and counts its
calls, so what was paid is known exactly."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import msgspec
import pytest
from conftest import SAMPLES
from llm_servers import ChatCompletionsAPI, Script, serve
from sample_agents.budgeted import Answer, Question

from mesh import Agent, Context, Message, message
from mesh.agent.launch import stop_process
from mesh.llm import OfflineLLM, Reply, Request, Text, Usage
from mesh.llm.budget import Budget, Spent, add, conversation_key, tenant_key
from mesh.llm.metering import Scope
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import Recorder, running_agent, spawn_agent
from mesh.transport import streams
from mesh.transport.identities import with_role
from mesh.transport.nats import NatsTransport
from mesh.transport.state import MemoryState, StateStore
from mesh.wire import envelope as h
from mesh.wire.errors import BudgetExceeded, RequestFailed
from mesh.wire.settings import Settings

PER_CALL = 30  # tokens each call of `Paid` uses: 20 in, 10 out


class Paid(OfflineLLM):
    """Answers every call with the same text and usage; counts the calls it was paid for."""

    def __init__(self) -> None:
        self.calls = 0

    async def chat(self, request: Request) -> Reply:
        self.calls += 1
        return Reply(content=[Text("ok")], usage=Usage(20, 10), model="test-model", provider="test")


@message("test.budget_ask", version=1)
class Ask(Message):
    prompt: str


@message("test.budget_said", version=1)
class Said(Message):
    text: str


def _agent(name: str) -> Agent:
    agent = Agent(name, description="Asks the model once per message")

    @agent.handler
    async def on_ask(ask: Ask, ctx: Context) -> Said:
        return Said(text=await ctx.llm.complete(system="Be brief.", prompt=ask.prompt))

    return agent


async def _state(operator: MeshClient, settings: Settings) -> StateStore:
    _, spec, *_ = streams.bucket_specs(settings)
    return await operator.transport.state(spec, settings)


async def _spent(store: StateStore, key: str) -> Spent:
    got = await store.get(key)
    assert got is not None, f"nothing counted under {key}"
    return msgspec.json.decode(got[0], type=Spent)


async def test_two_replicas_share_a_conversation_budget_and_its_breach_fails_the_request(
    client: MeshClient, operator: MeshClient, settings: Settings
) -> None:
    """Replica A pays for two calls, then only replica B runs: it refuses after two calls of
    its own, because it counts A's too (alone it would have allowed four). What was paid stays
    within the limit plus one call (the one that passed the check while 90 of 100 were
    spent), the bucket holds exactly what was paid, and the requester gets `RequestFailed`
    with kind ``budget_exceeded``; the request is dead-lettered with that kind."""
    limited = settings.model_copy(update={"budget_conversation_tokens": 100})
    conv = f"budget-conv-{uuid.uuid4().hex[:8]}"
    name = f"budget{uuid.uuid4().hex[:6]}"
    agent = _agent(name)
    a, b = Paid(), Paid()
    dlq = await Recorder.start(operator.transport, f"mesh.{conv}.dlq.{name}")

    async def ask(n: int) -> Said:
        return await client.request(name, Ask(prompt=f"q{n}"), Said, conversation=conv, timeout=10)

    async with running_agent(agent, limited, llm=a):
        assert [(await ask(n)).text for n in range(2)] == ["ok", "ok"]
    async with running_agent(agent, limited, llm=b):
        answered = 0
        with pytest.raises(RequestFailed) as failed:
            for n in range(2, 10):
                await ask(n)
                answered += 1
    assert failed.value.kind == "budget_exceeded"
    assert "100" in failed.value.reason
    assert (a.calls, b.calls, answered) == (2, 2, 2)
    paid = (a.calls + b.calls) * PER_CALL
    assert 100 <= paid <= 100 + PER_CALL
    spent = await _spent(await _state(operator, settings), conversation_key(conv))
    assert spent.tokens == paid
    [dead] = await dlq.wait_count(1, timeout=10)
    assert dead.headers[h.DLQ_KIND] == "budget_exceeded"


@pytest.mark.slow
async def test_two_agent_processes_share_a_conversation_budget(
    client: MeshClient,
    operator: MeshClient,
    settings: Settings,
    procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """The same across processes, with a model over HTTP that reports 18 tokens a call and a
    limit of 40: process A answers one question, then process B starts and A stops. B
    answers two (at 18 and 36 spent, below 40) and refuses the third: alone it would have
    answered three. The model was asked three times, 54 tokens, within the limit plus one
    call, and the bucket counted all three."""
    script = Script()
    conv = f"budget-procs-{uuid.uuid4().hex[:8]}"
    with serve(ChatCompletionsAPI, script) as url:
        env = {
            "MESH_LLM": "openai",
            "MESH_OPENAI_BASE_URL": url + "/v1",
            "MESH_BUDGET_CONVERSATION_TOKENS": "40",
            "MESH_LOG_LEVEL": "warning",
        }

        def start(i: int) -> subprocess.Popen[bytes]:
            spec = f"{SAMPLES / 'budgeted.py'}:agent"
            procs.append(spawn_agent(spec, settings, log=tmp_path / f"b{i}.log", env=env))
            return procs[-1]

        async def ask(n: int) -> Answer:
            question = Question(prompt=f"question {n}")
            return await client.request("budgeted", question, Answer, conversation=conv, timeout=20)

        a = start(0)
        await wait_for_agents(client.transport, {"budgeted": 1}, timeout=30)
        first = await ask(0)
        b = start(1)
        await wait_for_agents(client.transport, {"budgeted": 2}, timeout=30)
        assert await asyncio.to_thread(stop_process, a) == 0
        later = []
        with pytest.raises(RequestFailed) as failed:
            for n in range(1, 5):
                later.append(await ask(n))
        requests = len(script.requests)
    assert failed.value.kind == "budget_exceeded"
    assert first.pid == a.pid and [x.pid for x in later] == [b.pid, b.pid]
    assert requests == 3
    assert (
        (await _spent(await _state(operator, settings), conversation_key(conv))).tokens == 3 * 18 <= 40 + 18
    )


async def test_a_tenant_budget_spans_conversations_and_ends_stored_work_without_retries(
    client: MeshClient, operator: MeshClient, settings: Settings
) -> None:
    """A tenant's daily budget of 50 tokens: the first conversation's call spends 30, the
    second's 30 more (it passed the check at 30), the third conversation's message is not
    handled: a stored message, dead-lettered as ``budget_exceeded`` at its first delivery
    (never retried: a retry would find the budget spent). The same agent working for another
    tenant still answers."""
    tenant = f"t{uuid.uuid4().hex[:8]}"
    limited = settings.model_copy(update={"tenant": tenant, "budget_tenant_tokens": 50})
    name = f"tenant{uuid.uuid4().hex[:6]}"
    agent, model = _agent(name), Paid()
    convs = [f"budget-tenant-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    dlq = await Recorder.start(operator.transport, f"mesh.{convs[2]}.dlq.{name}")
    async with running_agent(agent, limited, llm=model):
        for conv in convs[:2]:
            said = await client.request(name, Ask(prompt="hello"), Said, conversation=conv, timeout=10)
            assert said.text == "ok"
        await client.send(name, Ask(prompt="hello"), conversation=convs[2])
        [dead] = await dlq.wait_count(1, timeout=10)
    assert dead.headers[h.DLQ_KIND] == "budget_exceeded"
    assert f"tenant {tenant!r}" in dead.headers[h.DLQ_REASON]
    assert h.DLQ_HISTORY not in dead.headers  # no failed deliveries before it
    assert model.calls == 2
    assert (await _spent(await _state(operator, settings), tenant_key(tenant))).tokens == 60

    other = Paid()
    elsewhere = settings.model_copy(update={"tenant": f"o{tenant}", "budget_tenant_tokens": 50})
    async with running_agent(agent, elsewhere, llm=other):
        said = await client.request(name, Ask(prompt="hello"), Said, conversation=convs[2], timeout=10)
    assert (said.text, other.calls) == ("ok", 1)


async def test_concurrent_additions_on_two_connections_lose_nothing(settings: Settings) -> None:
    """Two updaters, each on a connection of its own, add to one count at the same time:
    compare-and-set makes every loser read again, so the total is every addition."""
    operator = with_role(settings, "operator")
    key = conversation_key(f"cas-{uuid.uuid4().hex[:8]}")
    transports = [await NatsTransport.connect(operator, f"cas-{i}") for i in range(2)]
    try:
        _, spec, *_ = streams.bucket_specs(settings)
        stores = [await t.state(spec, operator) for t in transports]
        start = asyncio.Event()

        async def updater(store: StateStore) -> None:
            await start.wait()
            for _ in range(40):
                await add(store, key, 1, 0.5)

        tasks = [asyncio.create_task(updater(s)) for s in stores for _ in range(2)]  # 4 at once
        start.set()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        assert await _spent(stores[0], key) == Spent(tokens=160, usd=80.0)
    finally:
        for t in transports:
            await t.close()


async def test_a_usd_budget_and_the_check_outside_a_handling() -> None:
    """A dollar limit is checked like a token limit; a call made outside a handling (no agent
    in the scope) is neither checked nor counted; with no limits set nothing is read."""
    store = MemoryState()
    limited = Settings.load(environ={}, budget_conversation_usd=0.01)
    budget = Budget(limited, store=store)
    scope = Scope("default", "writer", "c1")
    priced = Reply(content=[Text("x")], usage=Usage(1000, 1000), model="claude-sonnet-4-5")  # $0.018
    await budget.check(scope)
    await budget.charge(scope, priced)
    with pytest.raises(BudgetExceeded, match=r"conversation 'c1'.*\$0\.0180 of \$0\.01"):
        await budget.check(scope)
    await budget.check(Scope("default", "", ""))  # outside a handling: never refused
    await budget.charge(Scope("default", "", "c1"), priced)
    assert (await _spent(store, conversation_key("c1"))).usd == pytest.approx(0.018)
    assert not Budget(Settings.load(environ={})).on
