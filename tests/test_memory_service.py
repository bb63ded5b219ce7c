"""The memory service on a real nats-server: typed request/reply, `ctx.memory`, typed
errors, an absent service, working memory and traces."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from mesh.agents.support import research
from mesh.schemas.memory import MemoryFailed, Recall, Recalled, Relation, Remember, Remembered
from mesh.schemas.support import ResearchFindings, ResearchRequest, TicketOpened
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sample_agents.memo import Note, Noted

from mesh import Agent, Context
from mesh.agent.identity import provision
from mesh.memory.client import Memory
from mesh.memory.scopes import Scopes
from mesh.memory.store import MemoryStore
from mesh.runtime.client import MeshClient
from mesh.services.memory import MemoryService, memory_agent
from mesh.testing import Recorder, running_agent
from mesh.wire.codec import default_codec
from mesh.wire.envelope import new_id
from mesh.wire.errors import MemoryRefused, MemoryUnavailable
from mesh.wire.settings import Settings


@pytest.fixture
def mem_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "memory_agent": f"memory-{uuid.uuid4().hex[:12]}",  # one service per test
            "memory_tenants": "default,acme",
            # the caller's identity names its tenant and namespaces; test-client is in 'default'
            "memory_scopes": "umbrella-agent=umbrella, alice-agent=acme/customer-alice|shared-*, "
            "bob-agent=default",
            "memory_turn_budget": 64,
            # the first call opens the store and the embedder: a busy machine takes longer
            # than the 2 s default for it, and that is not what these tests are about
            "memory_timeout": 15.0,
        }
    )


@pytest.fixture
async def service(mem_settings: Settings) -> AsyncIterator[MemoryService]:
    async def open_store() -> MemoryStore:
        return await MemoryStore.from_settings(mem_settings).open()

    scopes = Scopes.parse(mem_settings.memory_scopes)
    svc = MemoryService(open_store, budget=mem_settings.memory_turn_budget, scopes=scopes)
    async with running_agent(memory_agent(svc, mem_settings.memory_agent), mem_settings):
        yield svc
    await svc.close()


CALLERS: list[MeshClient] = []


async def _caller(settings: Settings, name: str) -> MeshClient:
    """A client on agent `name`'s own identity: the service takes the tenant from it."""
    client = await MeshClient.connect(await provision(Agent(name), settings), name)
    CALLERS.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_callers() -> AsyncIterator[None]:
    yield
    while CALLERS:
        await CALLERS.pop().close()


@pytest.fixture
def memory(client: MeshClient, mem_settings: Settings, service: MemoryService) -> Memory:
    return Memory(client, mem_settings)


async def test_remember_and_recall_through_the_mesh(memory: Memory) -> None:
    done = await memory.remember("Invoice INV-4471 was paid on March 3.", meta={"source": "erp"})
    assert not done.merged
    again = await memory.remember("Invoice INV-4471 was paid on March 3!")
    assert (again.id, again.merged, again.seen) == (done.id, True, 2)
    [top] = await memory.recall("INV-4471", k=1)
    assert (top.id, top.text, top.kind, top.seen, top.meta) == (
        done.id,
        "Invoice INV-4471 was paid on March 3.",
        "fact",
        2,
        {"source": "erp"},
    )
    assert top.provenance.agent == "test-client"
    assert await memory.forget(ids=[done.id]) == 1
    assert await memory.recall("INV-4471", k=1) == []


async def test_bad_input_gets_a_typed_error_reply_and_the_service_carries_on(
    memory: Memory, client: MeshClient, mem_settings: Settings
) -> None:
    cases: list[tuple[Any, str]] = [
        (memory.remember("x" * (mem_settings.memory_max_text + 1)), "oversize"),
        (memory.recall("q", where={"colour": "red"}), "bad_filter"),
        (memory.recall("q", where={"after": [1]}), "bad_filter"),
        (Memory(await _caller(mem_settings, "umbrella-agent"), mem_settings).recall("q"), "unknown_tenant"),
        (memory.recall("q", k=1000), "invalid"),
    ]
    for call, kind in cases:
        with pytest.raises(MemoryRefused) as caught:
            await call
        assert caught.value.kind == kind, caught.value.reason
    # a wrong vector dimension, sent as a raw typed request
    with pytest.raises(Exception) as raw:
        await client.request(
            mem_settings.memory_agent,
            Remember(text="v", vector=[0.5, 0.5]),
            Remembered,
            errors=(MemoryFailed,),
        )
    assert raw.value.answer == MemoryFailed(kind="dimension", reason=raw.value.answer.reason)  # type: ignore[attr-defined]
    assert "2 dimensions" in raw.value.answer.reason  # type: ignore[attr-defined]
    answer = await client.request(mem_settings.memory_agent, Recall(query="anything"), Recalled)
    assert answer.mode == "hybrid"


async def test_an_absent_memory_service_is_a_timely_error(client: MeshClient, settings: Settings) -> None:
    nobody = Memory(
        client, settings.model_copy(update={"memory_agent": "memory-nobody", "memory_timeout": 0.5})
    )
    with pytest.raises(MemoryUnavailable, match="memory-nobody"):
        await nobody.recall("anything")
    with pytest.raises(MemoryUnavailable):
        await nobody.remember("anything")


async def test_agents_use_ctx_memory_with_provenance_and_carry_on_when_it_is_down(
    mem_settings: Settings, service: MemoryService, client: MeshClient, spans: InMemorySpanExporter
) -> None:
    from sample_agents.memo import agent as memo

    conv = new_id()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.memtest.noted")
    async with running_agent(memo, mem_settings):
        first = await client.send("memo", Note(text="Ada prefers phone calls."), conversation=conv)
        await client.send(
            "memo",
            Note(text="Grace runs the navy team.", recall="who prefers phone calls"),
            conversation=conv,
        )
        msgs = await rec.wait_count(2)
    noted = {n.text: n for n in (default_codec.decode(m.data, Noted) for m in msgs)}
    answer = noted["Grace runs the navy team."]
    assert answer.error == "" and answer.recalled[0] == "Ada prefers phone calls."
    agent_name, message_id, trace_id = answer.sources[0].split("/")
    assert (agent_name, message_id) == ("memo", first.id)  # the write is traced to the note that caused it
    handler_spans = [s for s in spans.get_finished_spans() if s.name == "memo process memtest.note"]
    assert trace_id in {f"{s.context.trace_id:032x}" for s in handler_spans}
    memory_spans = [s for s in spans.get_finished_spans() if s.name == "memory remember"]
    assert any(f"{s.context.trace_id:032x}" == trace_id for s in memory_spans)  # one trace across the hop

    # the memory service is gone: the handler gets a timely error and carries on
    down = mem_settings.model_copy(update={"memory_agent": "memory-gone", "memory_timeout": 0.5})
    rec2 = await Recorder.start(client.transport, f"mesh.{conv}.evt.memtest.noted")
    async with running_agent(memo, down):
        await client.send("memo", Note(text="no memory now"), conversation=conv)
        [msg] = await rec2.wait_count(1)
    assert default_codec.decode(msg.data, Noted).error == "unavailable"


async def test_working_memory_compresses_older_turns_into_a_summary(
    client: MeshClient, mem_settings: Settings, service: MemoryService
) -> None:
    conv = new_id()

    class InConversation:
        async def request(self, agent: str, msg: Any, reply_type: Any, **kw: Any) -> Any:
            return await client.request(agent, msg, reply_type, conversation=conv, **kw)

    memory = Memory(InConversation(), mem_settings)
    turns = [
        f"turn {i}: the customer asks about order ORD-{1000 + i} and its delivery date" for i in range(12)
    ]
    for i, text in enumerate(turns):
        history = await memory.add_turn("user" if i % 2 == 0 else "agent", text)
        assert history.tokens <= mem_settings.memory_turn_budget + 64 // 2
    assert history.compressed > 0 and history.summary
    assert [t.text for t in history.turns] == turns[history.compressed :]
    assert "ORD-1000" in history.summary  # the offline model keeps the oldest folded turn
    again = await memory.history()
    assert (again.summary, again.compressed, [t.text for t in again.turns]) == (
        history.summary,
        history.compressed,
        [t.text for t in history.turns],
    )
    # working memory is not in the tenant's recall results
    assert await memory.recall("ORD-1000 delivery date") == []


async def test_the_tenant_comes_from_the_callers_identity_never_from_the_request(
    client: MeshClient, mem_settings: Settings, service: MemoryService
) -> None:
    """alice-agent is in tenant acme; bob-agent in default. bob asks for acme's memories in
    the body and reads only his own tenant's; alice is held to her declared namespaces; the
    provenance names the sender."""
    as_bob = await _caller(mem_settings, "bob-agent")
    alice = Memory(await _caller(mem_settings, "alice-agent"), mem_settings, tenant="default")
    bob = Memory(as_bob, mem_settings, tenant="acme")
    await alice.remember("Alice's card ends in 4242", namespace="customer-alice")
    await bob.remember("Bob's card ends in 1111", namespace="customer-alice")  # his own tenant
    [mine] = await alice.recall("card ends in", namespace="customer-alice")
    assert mine.text == "Alice's card ends in 4242" and mine.provenance.agent == "alice-agent"
    [his] = await bob.recall("card ends in", namespace="customer-alice")
    assert his.text == "Bob's card ends in 1111" and his.provenance.agent == "bob-agent"
    raw = Recall(query="card ends in", tenant="acme", namespace="customer-alice")
    answer = await as_bob.request(mem_settings.memory_agent, raw, Recalled)
    assert [h.text for h in answer.hits] == ["Bob's card ends in 1111"]
    assert await bob.forget(where={"kind": "fact"}, namespace="customer-alice") == 1  # only his
    assert [h.text for h in await alice.recall("card", namespace="customer-alice")] == [mine.text]
    with pytest.raises(MemoryRefused) as refused:
        await alice.recall("card", namespace="customer-bob")
    assert refused.value.kind == "not_allowed"
    assert await alice.recall("card", namespace="shared-kb") == []


def test_scopes_are_parsed_once_and_fail_early() -> None:
    from mesh.memory.scopes import Scope
    from mesh.wire.errors import ConfigError

    scopes = Scopes.parse("research=acme/customer-*, *=other")
    assert scopes.of("research") == Scope("acme", ("customer-*",))
    assert scopes.of("writer") == Scope("other")
    assert Scopes.parse("").of("anyone") == Scope("default")
    assert scopes.of("research").allows("customer-ada") and not scopes.of("research").allows("kb")
    with pytest.raises(ConfigError):
        Scopes.parse("research")


async def test_in_the_demo_one_customers_ticket_never_recalls_anothers(
    client: MeshClient, mem_settings: Settings, service: MemoryService
) -> None:
    """research remembers each ticket in its customer's namespace: Linus's ticket with the
    same words as Ada's finds nothing of hers; Ada's next ticket finds her earlier one."""
    probe = Agent("research-memory")

    @probe.handler(events=False)
    async def findings(req: ResearchRequest, ctx: Context) -> ResearchFindings:
        return await research._remember_and_recall(req, ctx)

    def ask(ticket_id: str, customer: str) -> ResearchRequest:
        ticket = TicketOpened(ticket_id=ticket_id, customer=customer, subject="Charged twice", body="refund")
        return ResearchRequest(ticket=ticket, category="billing", priority="high", summary="double charge")

    async with running_agent(probe, mem_settings):
        first = await client.request("research-memory", ask("T-1", "Ada"), ResearchFindings, timeout=15)
        other = await client.request("research-memory", ask("T-2", "Linus"), ResearchFindings, timeout=15)
        again = await client.request("research-memory", ask("T-3", "Ada"), ResearchFindings, timeout=15)
    assert first.findings == [] and other.findings == []
    assert len(again.findings) == 1 and "T-1" in again.findings[0] and "T-2" not in again.findings[0]
    assert research.customer_namespace("Ada Lovelace!") == "customer-ada-lovelace"


async def test_entities_through_the_mesh_scoped_by_the_callers_tenant_and_audited(
    client: MeshClient, operator: MeshClient, mem_settings: Settings, service: MemoryService
) -> None:
    """Upserted and merged over the wire, walked at depth 2, found by recall; alice (tenant
    acme) and bob (default) each see only their own entities, whatever ids they name; bad
    input is a typed refusal; each operation is in the audit trail (read with the operator
    role, as `mesh audit` reads it)."""
    from mesh.cli.audit import stored_records
    from mesh.runtime import audit

    memory = Memory(client, mem_settings)
    await memory.entity("apollo", type="project", attributes={"goal": "the moon"})
    await memory.entity("grace", type="person", relations=[("works_on", "apollo")])
    ada = await memory.entity(
        "ada", type="person", attributes={"name": "Ada Lovelace"}, relations=[("reports_to", "grace")]
    )
    assert (ada.id, ada.type, ada.provenance and ada.provenance.agent) == ("ada", "person", "test-client")
    ada = await memory.entity(
        "ada", attributes={"role": "analyst"}, relations=[Relation(name="works_on", to="apollo")]
    )
    assert ada.attributes == {"name": "Ada Lovelace", "role": "analyst"} and ada.seen == 2
    around = await memory.neighbourhood("ada", depth=1)
    assert [(e.id, e.depth) for e in around.entities] == [("ada", 0), ("grace", 1), ("apollo", 1)]
    wider = await memory.neighbourhood("apollo", depth=2, limit=2)
    assert wider.truncated and len(wider.entities) == 2
    assert {(e.source, e.name, e.target) for e in (await memory.neighbourhood("apollo", depth=2)).edges} == {
        ("ada", "reports_to", "grace"),
        ("ada", "works_on", "apollo"),
        ("grace", "works_on", "apollo"),
    }
    [top] = await memory.recall("Ada Lovelace the analyst", k=1, where={"kind": "entity"})
    assert top.meta == {"entity": "ada", "type": "person"} and top.kind == "entity"

    alice = Memory(await _caller(mem_settings, "alice-agent"), mem_settings)
    bob = Memory(await _caller(mem_settings, "bob-agent"), mem_settings)
    await alice.entity("apollo", type="project", attributes={"budget": "secret"}, namespace="customer-alice")
    # bob, in tenant default, names alice's namespace and her entity's id: he reaches only his own
    await bob.entity("eve", type="person", relations=[("works_on", "apollo")], namespace="customer-alice")
    theirs = await bob.neighbourhood("eve", depth=2, namespace="customer-alice")
    assert ([e.id for e in theirs.entities], theirs.edges) == (["eve"], [])
    assert (await bob.neighbourhood("apollo", namespace="customer-alice")).entities == []
    hers = await alice.neighbourhood("apollo", depth=2, namespace="customer-alice")
    assert [(e.id, e.attributes) for e in hers.entities] == [("apollo", {"budget": "secret"})]
    assert [e.id for e in (await memory.neighbourhood("apollo")).entities] == ["apollo", "ada", "grace"]

    cases: list[tuple[Any, str, str]] = [
        (memory.entity("bad id!", type="person"), "invalid", "entity id 'bad id!'"),
        (memory.entity("newcomer"), "invalid", "give it a type"),
        (memory.entity("ada", relations=[("Reports-To", "grace")]), "invalid", "relation name"),
        (memory.entity("ada", attributes={"bio": "x" * 5000}), "oversize", "5000 characters"),
        (memory.entity("ada", attributes={"tags": ["a"]}), "invalid", "got list"),
        (memory.neighbourhood("ada", depth=9), "invalid", "depth"),
        (memory.neighbourhood("ada", limit=10_000), "invalid", "limit"),
        (alice.neighbourhood("apollo", namespace="customer-bob"), "not_allowed", "customer-bob"),
    ]
    for call, kind, fragment in cases:
        with pytest.raises(MemoryRefused) as refused:
            await call
        assert (refused.value.kind, fragment in refused.value.reason) == (kind, True), refused.value.reason

    records = [audit.decoded(data) async for _, _, data in stored_records(operator.transport)]
    ops = [(r.kind, r.detail["status"]) for r in records if r.writer == mem_settings.memory_agent]
    assert ops.count(("memory.upsert_entity", "ok")) == 6
    assert ("memory.neighbourhood", "ok") in ops and ("memory.neighbourhood", "not_allowed") in ops
    assert ops.count(("memory.upsert_entity", "invalid")) == 4
