"""Hostile and unlucky input, as the real bytes through a real nats-server: no message may
silence an agent, and every one that reaches it ends handled, answered or dead-lettered."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import pytest
from conftest import stored_dead_letters
from sample_agents.echo import Ping, Pong

from mesh import Agent, Context
from mesh.agent.identity import provision
from mesh.cli.dlq import list_dead_letters, redrive
from mesh.join import JoinTimer, all_of
from mesh.runtime.client import Lineage, MeshClient
from mesh.testing import Recorder, running_agent
from mesh.transport import streams
from mesh.transport.identities import with_role
from mesh.transport.keys import signer_of
from mesh.transport.natsclient import header_bytes
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.errors import ConfigError, RequestFailed
from mesh.wire.settings import Settings
from mesh.wire.signature import Signer
from mesh.wire.subjects import Address


@pytest.fixture
def client(operator: MeshClient) -> MeshClient:
    """Watching and re-driving dead letters, and writing the processed records, take
    the operator role (as `mesh dlq` has)."""
    return operator


victim = Agent("victim", description="takes hostile input")
handled: list[str] = []


@victim.handler
async def on_ping(ping: Ping, ctx: Context) -> Pong:
    if ping.text == "boom":
        raise RuntimeError("Zahlung für Kunde 4 fehlgeschlagen")
    if ping.text == "nats-timeout":
        raise nats.errors.TimeoutError  # what a request inside a handler raises
    handled.append(ctx.message_id)
    return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)


gather = victim.join("gather", Pong, policy=all_of())


@gather.complete
async def on_gathered(result: Any, ctx: Context) -> None:
    pass


def _signer(settings: Settings) -> Signer:
    signer = signer_of(with_role(settings, "operator"))  # the client's
    assert signer is not None
    return signer


async def _alive(client: MeshClient, conv: str) -> None:
    """The agent still answers: a request over its direct line gets its reply."""
    pong = await client.request("victim", Ping(text="alive?"), Pong, timeout=10, conversation=conv)
    assert pong.text == "alive?"


def _headers(client: MeshClient, conv: str, type_name: str = "test.ping", **extra: str) -> dict[str, str]:
    headers = client.headers(type_name, 1, conv, Lineage())
    headers.update(extra)
    return headers


async def test_a_long_conversation_id_on_a_stored_subject_is_dead_lettered_under_a_safe_one(
    settings: Settings, client: MeshClient
) -> None:
    conv = "c" * 3_900  # the publisher's own control line still fits in 4 KiB
    async with running_agent(victim, settings):
        dlq = await Recorder.start(client.transport, "mesh._.dlq.victim")
        raw = client.transport.nc  # type: ignore[attr-defined]  # a client that checks nothing
        headers, subject = _headers(client, "c1"), f"mesh.{conv}.agent.victim"
        _signer(settings).sign(subject, headers, b'{"text": "x"}')
        await raw.publish(subject, b'{"text": "x"}', headers=headers)
        [letter] = await dlq.wait_count(1)
        assert letter.headers[h.DLQ_KIND] == "bad_subject"
        assert letter.headers[h.DLQ_SUBJECT] == f"mesh.{conv}.agent.victim"
        await _alive(client, "c1")
        stream = settings.dead_letter_stream
        newest = (await list_dead_letters(client.transport, stream, conversation="_"))[-1]
        assert newest.original_subject == f"mesh.{conv}.agent.victim"
        with pytest.raises(ConfigError, match="not a mesh subject"):
            await redrive(client.transport, stream, newest.seq)


async def test_a_body_near_max_payload_is_dead_lettered_whole_in_two_parts(
    settings: Settings, client: MeshClient
) -> None:
    """With its Mesh-Dlq-* headers the dead letter would be over max_payload: it is cut, and
    the rest of the body follows as a continuation, so no byte is lost."""
    conv = h.new_id()
    headers = _headers(client, conv)
    _signer(settings).sign("", headers, b"")  # the signature's headers take room too
    room = client.transport.max_payload  # type: ignore[attr-defined]
    size = room - header_bytes(headers) - 40
    body = (bytes(range(256)) * (size // 256 + 1))[:size]
    async with running_agent(victim, settings):
        dlq = await Recorder.start(client.transport, f"mesh.{conv}.dlq.victim")
        await client.send_raw(Address.inbox(conv, "victim").subject, body, headers, store=True)
        letter, rest = await dlq.wait_count(2, timeout=30)
        assert letter.headers[h.DLQ_KIND] == "oversize"
        assert letter.headers[h.DLQ_TRUNCATED] == str(len(body))
        assert rest.headers[h.DLQ_KIND] == "continuation"
        assert rest.headers[h.DLQ_OF] == letter.headers[h.DLQ_ID]
        assert int(rest.headers[h.DLQ_OFFSET]) == len(letter.data)
        assert letter.data + rest.data == body
        await _alive(client, conv)
        # `mesh dlq redrive` joins the two parts again; the continuation alone is refused
        stream = settings.dead_letter_stream
        letters = await stored_dead_letters(client.transport, stream, conv, 2)
        [seq, rest_seq] = [d.seq for d in letters]
        with pytest.raises(ConfigError, match="rest of a truncated"):
            await redrive(client.transport, stream, rest_seq)
        inbox = await Recorder.start(client.transport, Address.inbox(conv, "victim").subject)
        await redrive(client.transport, stream, seq)
        [again] = await inbox.wait_count(1, timeout=30)
        assert again.data == body


@pytest.mark.parametrize("odd", ["order:17", "a b", "zahlung-für-4", "x.y.z", "*", ">", "id/with/slashes"])
async def test_ids_of_any_alphabet_are_handled_once_and_retried_when_they_fail(
    settings: Settings, client: MeshClient, odd: str
) -> None:
    """Ids are any string: the duplicate guard and the failure history hash them into keys."""
    conv = h.new_id()
    async with running_agent(victim, settings) as runtime:
        dlq = await Recorder.start(client.transport, f"mesh.{conv}.dlq.victim")
        await client.send("victim", Ping(text="fine"), conversation=conv, msg_id=odd)
        async with asyncio.timeout(10):
            while odd not in handled:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        await client.send("victim", Ping(text="boom"), conversation=conv, msg_id=odd + "!")
        [letter] = await dlq.wait_count(1, timeout=20)
        assert letter.headers[h.DLQ_KIND] == "handler_error"
        assert letter.headers[h.DLQ_DELIVERIES] == str(settings.max_deliver)
        assert "Zahlung für Kunde 4" in letter.headers[h.DLQ_REASON]
        assert runtime.stats.retried == settings.max_deliver - 1


async def test_the_guard_asks_on_the_first_delivery_too_under_the_id_it_writes(
    insecure_settings: Settings,
) -> None:
    """After a broker crash, a processed message can come back with a delivery count of 1;
    and a message with Nats-Msg-Id but no Mesh-Id is marked under that id. Insecure server:
    a message without Mesh-Id is only taken unsigned (a signed one needs it)."""
    settings, conv = insecure_settings, h.new_id()
    async with running_agent(victim, settings) as runtime, await MeshClient.connect(settings, "t") as client:
        processed = await client.transport.state(streams.bucket_specs(settings)[0], settings)
        await processed.put(streams.processed_key("victim", "done-before"), b"1")
        headers = _headers(client, conv)
        del headers[h.ID]
        headers[h.NATS_MSG_ID] = "done-before"
        await client.send_raw(Address.inbox(conv, "victim").subject, b'{"text": "x"}', headers, store=True)
        await _alive(client, conv)
        async with asyncio.timeout(10):
            while runtime.stats.duplicates < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert "done-before" not in handled
        # and one handled under a Nats-Msg-Id only is marked under that same id
        headers[h.NATS_MSG_ID] = "only-nats-id"
        await client.send_raw(Address.inbox(conv, "victim").subject, b'{"text": "y"}', headers, store=True)
        async with asyncio.timeout(10):
            while "only-nats-id" not in handled:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        async with asyncio.timeout(10):
            while await processed.get(streams.processed_key("victim", "only-nats-id")) is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("subject_kind", "type_name", "body", "answer"),
    [
        ("timer", "mesh.join_timer", JoinTimer(join="NoSuchJoin", due_ms=1), "victim.NoSuchJoin/timer"),
        ("timer", "mesh.join_timer", JoinTimer(join="*", due_ms=1), ""),
        ("agent", "test.pong", Pong(text="x", n=1, pid=0, instance="i"), "victim.NoSuchJoin/timer"),
        ("agent", "test.pong", Pong(text="x", n=1, pid=0, instance="i"), "victim.*/0"),
        ("agent", "test.pong", Pong(text="x", n=1, pid=0, instance="i"), "victim.>/0"),
        ("agent", "test.pong", Pong(text="x", n=1, pid=0, instance="i"), "victim.NoSuchJoin/0"),
    ],
)
async def test_answers_and_timers_of_unknown_joins_are_dead_lettered_at_once(
    settings: Settings, client: MeshClient, subject_kind: str, type_name: str, body: Any, answer: str
) -> None:
    conv = h.new_id()
    async with running_agent(victim, settings) as runtime:
        dlq = await Recorder.start(client.transport, f"mesh.{conv}.dlq.victim")
        headers = _headers(client, conv, type_name)
        if answer:
            headers[h.ANSWER] = answer
        subject = f"mesh.{conv}.{subject_kind}.victim"
        if subject_kind == "timer":  # sent by victim itself: a stranger's timer is refused first
            headers[h.SENDER] = "victim"
            async with await MeshClient.connect(await provision(victim, settings), "victim") as own:
                await own.send_raw(subject, default_codec.encode(body), headers, store=True)
        else:
            await client.send_raw(subject, default_codec.encode(body), headers, store=True)
        [letter] = await dlq.wait_count(1)
        assert letter.headers[h.DLQ_KIND] == "unknown_join"
        assert h.DLQ_DELIVERIES not in letter.headers  # at once, not after retries
        assert runtime.stats.retried == 0
        await _alive(client, conv)


@pytest.mark.parametrize(
    ("data", "extra", "kind"),
    [
        (b"{not json", {}, "decode"),
        (b'{"text": 5}', {}, "validation"),
        (b'{"text": "x"}', {h.HOP: "x"}, "bad_header"),
        (b'{"text": "x"}', {h.ID: "i" * 10_000}, "bad_header"),
        (b'{"text": "boom"}', {}, "handler_error"),
    ],
)
async def test_a_bad_request_is_answered_with_the_reason_not_left_to_time_out(
    settings: Settings, client: MeshClient, data: bytes, extra: dict[str, str], kind: str
) -> None:
    conv = h.new_id()
    async with running_agent(victim, settings):
        dlq = await Recorder.start(client.transport, f"mesh.{conv}.dlq.victim")
        answer = await client.request_raw(
            Address.direct(conv, "victim").subject, data, _headers(client, conv, **extra), timeout=10
        )
        assert answer.headers[h.TYPE] == "mesh.delivery_failed"
        failed = msgspec_json(answer.data)
        assert failed["kind"] == kind and failed["agent"] == "victim" and failed["reason"]
        [letter] = await dlq.wait_count(1)
        assert letter.headers[h.DLQ_KIND] == kind
        # the typed client turns it into an error that says why
        with pytest.raises(RequestFailed) as caught:
            await client.request("victim", Ping(text="boom"), Pong, timeout=10, conversation=conv)
        assert caught.value.kind == "handler_error" and "Zahlung" in caught.value.reason


async def test_a_timeout_inside_a_handler_is_not_reported_as_the_handler_timeout(
    settings: Settings, client: MeshClient
) -> None:
    conv = h.new_id()
    async with running_agent(victim, settings):
        dlq = await Recorder.start(client.transport, f"mesh.{conv}.dlq.victim")
        await client.send("victim", Ping(text="nats-timeout"), conversation=conv)
        [letter] = await dlq.wait_count(1, timeout=20)
        reason = letter.headers[h.DLQ_REASON]
        assert "MESH_HANDLER_TIMEOUT" not in reason
        assert "timed out" in reason and "nats.errors.TimeoutError" in reason


def msgspec_json(data: bytes) -> dict[str, Any]:
    import msgspec

    return msgspec.json.decode(data)  # type: ignore[no-any-return]


async def test_an_agent_whose_connection_the_server_closed_exits_with_an_error(
    settings: Settings, client: MeshClient
) -> None:
    """nats-py never reconnects after the server closed the connection with -ERR: `serve`
    must end with an error (the process exits non-zero), not idle deaf."""
    from mesh.agent.serving import serve
    from mesh.wire.errors import ServerError

    doomed = Agent("doomed")

    @doomed.handler
    async def on_ping(ping: Ping, ctx: Context) -> None:
        raw = ctx._client.transport.nc  # type: ignore[attr-defined]  # past the transport's checks
        await raw.publish("mesh." + "x" * 5000 + ".agent.a", b"")

    ready = asyncio.Event()
    serving = asyncio.create_task(serve(doomed, settings, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    await client.send("doomed", Ping(text="x"), durable=False)
    with pytest.raises(ServerError, match="closed"):
        await asyncio.wait_for(serving, 20)


async def test_a_replayed_message_is_not_handled_again(settings: Settings, client: MeshClient) -> None:
    """A copy of a handled message sent again later (same Mesh-Id, a new Nats-Msg-Id so the
    stream's dedupe does not catch it) is acknowledged without running the handler."""
    conv = h.new_id()
    async with running_agent(victim, settings):
        processed = await client.transport.state(streams.bucket_specs(settings)[0], settings)
        headers = _headers(client, conv)
        subject = Address.inbox(conv, "victim").subject
        await client.send_raw(subject, b'{"text": "pay once"}', headers, store=True)
        key = streams.processed_key("victim", headers[h.ID])
        async with asyncio.timeout(10):
            while not await processed.exists(key):  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    # to a fresh runtime (a restart), which has not seen the id: only the guard stops it
    async with running_agent(victim, settings) as runtime:
        replay = {**headers, h.NATS_MSG_ID: h.new_id()}
        await client.send_raw(subject, b'{"text": "pay once"}', replay, store=True)
        async with asyncio.timeout(10):
            while runtime.stats.duplicates < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert handled.count(headers[h.ID]) == 1
