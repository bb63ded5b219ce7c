"""The conversation record (mesh.observability.record, .history) on a real server with auth on:
every message of a conversation is kept once, with what became of it, after the work
streams have forgotten it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import msgspec
from click.testing import CliRunner
from sample_agents.echo import Ping, Pong
from sample_agents.echo import agent as echo

from mesh import Agent, Context
from mesh.observability import history
from mesh.observability import record as rec
from mesh.runtime.client import MeshClient
from mesh.testing import running_agent
from mesh.transport.identities import with_role
from mesh.transport.nats import NatsTransport
from mesh.transport.streams import INBOX
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import default_codec
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address


@asynccontextmanager
async def connected(settings: Settings, name: str) -> AsyncIterator[NatsTransport]:
    transport = await NatsTransport.connect(settings, name)
    try:
        yield transport
    finally:
        await transport.close()


async def _until(
    read: Callable[[], Awaitable[list[history.Recorded]]], done: Callable[[list[history.Recorded]], bool]
) -> list[history.Recorded]:
    """The record as soon as `done` holds (entries are stored without waiting), at most 10 s."""
    msgs: list[history.Recorded] = []
    for _ in range(200):
        msgs = await read()
        if done(msgs):
            return msgs
        await asyncio.sleep(0.05)
    raise AssertionError(f"the record never got there: {[(m.type, m.deliveries) for m in msgs]}")


async def test_a_handoff_chain_is_recorded_whole_after_its_inbox_messages_are_gone(
    settings: Settings, client: MeshClient, operator: MeshClient
) -> None:
    from sample_agents.relay import Baton, first, second, third

    async with (
        running_agent(first, settings),
        running_agent(second, settings),
        running_agent(third, settings),
        connected(with_role(settings, "observer"), "watcher") as watcher,
    ):
        reply_to = Address.reply("rec1", "me").subject
        sent = await client.publish(Baton(token="t1"), conversation="rec1", reply_to=reply_to)

        def finished(ms: list[history.Recorded]) -> bool:
            return any(m.subject == reply_to for m in ms) and all(
                m.deliveries for m in ms if m.kind == subjects.AGENT or m.kind == subjects.EVENT
            )

        msgs = await _until(lambda: history.conversation(watcher, "rec1"), finished)
    # the work queue kept none of the handoffs (acknowledged, so deleted): only the record has them
    assert await operator.transport.stored_next(INBOX, 1, "mesh.rec1.>") is None
    by_id = {m.id: m for m in msgs}
    assert len(by_id) == len(msgs) == 4  # the event, two handoffs, the answer: each once
    root = by_id[sent.id]
    assert root.causation == "" and root.sent_by == "publisher"  # the client, under its role's name
    handoffs = [m for m in msgs if m.kind == subjects.AGENT]
    assert sorted(a.target for a in (subjects.parse(m.subject) for m in handoffs) if a) == ["second", "third"]
    for m in handoffs:
        assert m.sent_by in ("first", "second")  # recorded by its sender, as it went out (signed)
        assert m.headers.get("Mesh-Signature")
        assert [(d.agent, d.outcome, d.attempt) for d in m.deliveries] == [
            (subjects.parse(m.subject).target, rec.HANDLED, 1)  # type: ignore[union-attr]
        ]
        assert m.causation in by_id
    answer = next(m for m in msgs if m.subject == reply_to)
    assert answer.sent_by == "third" and not answer.deliveries
    assert len({m.trace_id for m in msgs if m.trace_id}) == 1  # one trace (the root came from outside any)

    summary = history.summarize("rec1", msgs)
    assert summary.status == history.DONE
    assert set(summary.agents) >= {"first", "second", "third"}
    assert summary.messages == 4 and summary.duration >= 0


async def test_direct_requests_and_their_answers_are_recorded(settings: Settings, client: MeshClient) -> None:
    async with running_agent(echo, settings):
        pong = await client.request("echo", Ping(text="hi"), Pong, conversation="rec2")
        assert pong.text
        msgs = await _until(
            lambda: history.conversation(client.transport, "rec2"),
            lambda ms: len(ms) == 2 and all(m.deliveries for m in ms if m.kind == subjects.DIRECT),
        )
    question = next(m for m in msgs if m.kind == subjects.DIRECT)
    answer = next(m for m in msgs if m is not question)
    assert question.type == "test.ping" and question.deliveries[0].outcome == rec.HANDLED
    assert answer.causation == question.id and answer.sent_by == "echo"
    assert answer.body()["text"] == pong.text


strict = Agent("strictrec", description="fails what it is asked")


@strict.handler
async def refuse(ping: Ping, ctx: Context) -> None:
    raise RuntimeError(f"cannot handle {ping.text}")


async def test_a_dead_lettered_message_makes_the_conversation_failed(
    settings: Settings, operator: MeshClient
) -> None:
    quick = settings.model_copy(update={"max_deliver": 2, "retry_backoff": 0.05})
    async with running_agent(strict, quick):
        await operator.send("strictrec", Ping(text="x"), conversation="rec3")
        msgs = await _until(
            lambda: history.conversation(operator.transport, "rec3"),
            lambda ms: any(d.outcome == rec.DEAD_LETTER for m in ms for d in m.deliveries),
        )
    (ping,) = msgs
    assert [(d.outcome, d.attempt) for d in ping.deliveries] == [(rec.RETRY, 1), (rec.DEAD_LETTER, 2)]
    assert "cannot handle x" in ping.deliveries[0].reason
    assert history.summarize("rec3", msgs).status == history.FAILED


async def test_recent_lists_conversations_newest_first(settings: Settings, client: MeshClient) -> None:
    async with running_agent(echo, settings):
        for conv in ("recA", "recB"):
            await client.request("echo", Ping(text=conv), Pong, conversation=conv)
        await _until(
            lambda: history.conversation(client.transport, "recB"),
            lambda ms: any(m.deliveries for m in ms),
        )
    summaries = await history.recent(client.transport, limit=50)
    ids = [s.id for s in summaries]
    assert ids.index("recB") < ids.index("recA")
    b = next(s for s in summaries if s.id == "recB")
    assert b.status == history.DONE and "echo" in b.agents and b.messages == 2


async def test_a_kept_recent_list_reads_only_what_was_recorded_since(
    settings: Settings, client: MeshClient
) -> None:
    async def done(conv: str, messages: int = 2) -> None:
        await client.request("echo", Ping(text=conv), Pong, conversation=conv)
        await _until(lambda: history.conversation(client.transport, conv), lambda ms: len(ms) == messages)

    async with running_agent(echo, settings):
        await done("recKa")
        listing = history.Recent(client.transport, scan=100_000)
        small = history.Recent(client.transport, scan=1)  # holds one entry at most
        assert [s.id for s in await small.read(10)] == ["recKa"]
        first = [s.id for s in await listing.read(500)]
        assert first[0] == "recKa"
        read_once = listing.fetched
        _, last = await client.transport.stream_bounds(history.RECORD)
        await done("recKb")
        await done("recKa", 4)  # an older conversation touched again comes back to the top
        _, now = await client.transport.stream_bounds(history.RECORD)
        again = await listing.read(500)
    assert listing.fetched - read_once == now - last  # only the new entries were read
    assert [s.id for s in again][:2] == ["recKa", "recKb"]
    ka = again[0]
    assert ka.messages == 4 and ka.status == history.DONE  # its summary covers both exchanges
    assert [s.id for s in again] == [s.id for s in await history.recent(client.transport, limit=500)]
    # one echo handling is one entry here: the small reader let the older ones go as it read
    assert [s.id for s in await small.read(10)] == ["recKa"] and small.held == 1
    # a reader left behind by more than `scan` entries starts again from the newest `scan`,
    # and one conversation longer than `scan` keeps only its newest entries
    behind = history.Recent(client.transport, scan=2)
    await behind.read(10)
    async with running_agent(echo, settings):
        for _ in range(4):
            await client.request("echo", Ping(text="again"), Pong, conversation="recKc")
        await _until(lambda: history.conversation(client.transport, "recKc"), lambda ms: len(ms) == 8)
    fetched = behind.fetched
    assert [s.id for s in await behind.read(10)] == ["recKc"]
    assert behind.fetched - fetched == 2 and behind.held == 2
    async with running_agent(echo, settings):  # one more: its oldest held entry goes
        await client.request("echo", Ping(text="once more"), Pong, conversation="recKc")
        await _until(lambda: history.conversation(client.transport, "recKc"), lambda ms: len(ms) == 10)
    assert [s.id for s in await behind.read(10)] == ["recKc"]
    assert behind.fetched - fetched == 3 and behind.held == 2


async def test_an_agent_may_record_only_under_its_own_name(settings: Settings) -> None:
    from mesh.testing import provision

    agent_settings = await provision(echo, settings)
    async with connected(agent_settings, "echo") as t:
        await t.publish(subjects.record_subject("rec4", "other"), b"{}", {h.ID: "forged"})
        await t.publish(subjects.record_subject("rec4", "echo"), b"{}", {h.ID: "own"})
        await t.flush()
        await asyncio.sleep(0.2)
    async with connected(with_role(settings, "observer"), "w") as watcher:
        stored = [e async for e in history.entries(watcher, subjects.record_pattern("rec4"))]
    assert [e.subject for e in stored] == ["mesh_record.rec4.echo"]  # the server refused the other


async def test_recording_can_be_turned_off(settings: Settings, client: MeshClient) -> None:
    """A client leaves a request to the agent it asks to record; with MESH_RECORD=false the
    agent records nothing, so the conversation is not in the record (and is, recorded)."""
    for conv, record in (("rec5-off", False), ("rec5-on", True)):
        async with running_agent(echo, settings.model_copy(update={"record": record})):
            await client.request("echo", Ping(text="q"), Pong, conversation=conv)
            await asyncio.sleep(0.3)
    off = [e async for e in history.entries(client.transport, subjects.record_pattern("rec5-off"))]
    on = [e async for e in history.entries(client.transport, subjects.record_pattern("rec5-on"))]
    assert off == [] and [str(e.subject).rsplit(".", 1)[-1] for e in on] == ["echo"]


async def test_a_compromised_agent_cannot_rewrite_or_break_the_record(
    settings: Settings, client: MeshClient
) -> None:
    """An agent with valid credentials writes garbage and forgeries under its own name into
    a conversation's record: readers skip the garbage, keep the real messages as their
    senders and receivers recorded them, and the commands still work."""
    from mesh.cli.main import cli
    from mesh.testing import provision

    async with running_agent(echo, settings):
        pong = await client.request("echo", Ping(text="real"), Pong, conversation="rec6")
        real = await _until(
            lambda: history.conversation(client.transport, "rec6"),
            lambda ms: len(ms) == 2 and all(m.deliveries for m in ms if m.kind == subjects.DIRECT),
        )
    question = next(m for m in real if m.kind == subjects.DIRECT)
    pong_id = next(m.id for m in real if m is not question)
    mallory = Agent("mallory", description="compromised")

    @mallory.handler
    async def noop(ping: Ping) -> None:
        return None

    own = subjects.record_subject("rec6", "mallory")
    forged = {**question.headers, h.SENDER: question.sender}
    entries = [
        rec.Entry(
            sent=[rec.Copy("mesh.rec6.agent.x", {h.ID: "g1"}, b"\xff\x00not json")]
        ),  # undecodable body
        rec.Entry(sent=[rec.Copy("mesh.rec6.agent.x", {}, b"{}")]),  # no id
        rec.Entry(
            received=rec.Copy("mesh.rec6.agent.x", {h.ID: "g3"}, b"{}"), delivery=-5, millis=float("nan")
        ),
        rec.Entry(received=rec.Copy("x", {h.ID: "g4", h.SENT_AT: "soon"}, b"{}"), outcome="?" * 300),
        rec.Entry(sent=[rec.Copy("not.a.mesh.subject", {h.ID: "g5", h.SENT_AT: "9" * 40}, b"{}")]),
        # a handling that claims to have sent the real question: the sender is not its writer
        rec.Entry(
            received=rec.Copy("mesh.rec6.agent.mallory", {h.ID: "g7"}, b"{}"),
            sent=[rec.Copy(question.subject, forged, b'{"text": "forged"}')],
            outcome=rec.HANDLED,
        ),
        # a forged copy of the real question, claiming the real sender, and one as itself
        rec.Entry(sent=[rec.Copy(question.subject, forged, b'{"text": "forged"}')]),
        rec.Entry(sent=[rec.Copy(question.subject, {**forged, h.SENDER: "mallory"}, b'{"text": "forged"}')]),
    ]
    hostile = [rec.encode_entry(e) for e in entries] + [
        b"\x93garbage",  # not an entry
        msgspec.msgpack.encode([["s", {"Mesh-Id": 7}, "not bytes"]]),  # the wrong shapes
        msgspec.msgpack.encode({"received": "x"}),
        b"",
    ]
    agent_settings = await provision(mallory, settings)
    async with connected(agent_settings, "mallory") as t:
        for data in hostile:
            await t.publish(own, data)
        await t.flush()
    msgs = await _until(
        lambda: history.conversation(client.transport, "rec6"),
        lambda ms: any(m.id == "g5" for m in ms),
    )
    kept = next(m for m in msgs if m.id == question.id)
    # the copy echo took (the client left its request to echo): not a forgery
    assert kept.body()["text"] == "real" and kept.sent_by == ""
    ids = {m.id for m in msgs}
    assert ids == {question.id, pong_id, "g1", "g3", "g4", "g5", "g7"}
    assert "bytes, not json" in str(next(m for m in msgs if m.id == "g1").body())
    summary = history.summarize("rec6", msgs)  # no exception
    # a claimed send time of 9...9 ns (year 3e22) does not stretch the conversation: it took
    # as long as its entries were being stored, by the server's clock
    assert 0 <= summary.ended - summary.started < 600
    env = {"MESH_NATS_URL": settings.nats_url or "", "MESH_DATA_DIR": str(settings.data_dir)}
    for args in (["show", "rec6"], ["show", "rec6", "--json"], ["conversations", "--json"]):
        result = await asyncio.to_thread(CliRunner().invoke, cli, args, env=env)
        assert result.exit_code == 0, (args, result.output, result.exception)
    assert pong.text


async def test_secret_headers_never_reach_the_record(settings: Settings, client: MeshClient) -> None:
    from sample_agents.echo import Ping as P

    async with running_agent(echo, settings):
        headers = client.headers("test.ping", 1, "rec7")
        headers.update({"Authorization": "Bearer s3cret", "X-Api-Key": "s3cret-2", "X-Tenant": "acme"})
        await client.send_raw("mesh.rec7.agent.echo", default_codec.encode(P(text="k")), headers, store=True)
        await _until(
            lambda: history.conversation(client.transport, "rec7"),
            lambda ms: any(m.deliveries for m in ms),
        )
    stored = [e async for e in history.entries(client.transport, subjects.record_pattern("rec7"))]
    assert {str(e.subject).rsplit(".", 1)[-1] for e in stored} == {"echo"}  # the client left it to echo
    for e in stored:  # neither in the entries' headers nor in the copies a handling holds
        assert "s3cret" not in repr(e.headers) and "s3cret" not in repr(e.data)
    [ping] = [m for m in history.merge(stored) if m.id == headers[h.ID]]
    assert ping.headers.get("X-Tenant") == "acme" and "Authorization" not in ping.headers  # others are kept
