"""An agent in this process against the real server: dispatch, replies, dead letters."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from conftest import raw_connect
from sample_agents.echo import Ping, Pong
from sample_agents.echo import agent as echo

from mesh import Agent, Context
from mesh.runtime.client import Lineage, MeshClient
from mesh.testing import Recorder, running_agent
from mesh.transport.identities import with_role
from mesh.wire import envelope as h
from mesh.wire.codec import MSGPACK, default_codec
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address


@pytest.fixture
def client(operator: MeshClient) -> MeshClient:
    """Most tests here watch dead letters, which only the operator role may read
    (`mesh dlq` has it); the work itself is sent as a person's or a program's would be."""
    return operator


async def test_event_reaches_agent_and_return_value_is_the_reply(
    settings: Settings, client: MeshClient
) -> None:
    async with running_agent(echo, settings):
        rec = await Recorder.start(client.transport, "mesh.*.evt.test.pong")
        sent = await client.publish(Ping(text="hi", n=1))
        [msg] = await rec.wait_count(1)
        pong = default_codec.decode(msg.data, Pong)
        assert (pong.text, pong.n) == ("hi", 1)
        assert msg.headers[h.CAUSATION] == sent.id
        assert msg.headers[h.CONVERSATION] == sent.conversation
        assert msg.headers[h.SENDER] == "echo"
        assert msg.headers[h.HOP] == "1"
        assert msg.headers[h.NATS_MSG_ID] == msg.headers[h.ID]


async def test_nats_request_gets_the_reply(insecure_settings: Settings) -> None:
    """A plain NATS request (as any client can send) to an agent's direct line is answered
    on its reply subject. Insecure server: a client with no mesh library and no identity
    is the promise of an insecure mesh (docs/protocol.md); with identities it must sign."""
    settings = insecure_settings
    async with running_agent(echo, settings), await MeshClient.connect(settings, "plain") as client:
        nc = client.transport.nc  # type: ignore[attr-defined]
        reply = await nc.request(
            Address.direct("req1", "echo").subject,
            b'{"text":"plain","n":7}',
            timeout=5,
            headers={h.TYPE: "test.ping"},
        )
        assert default_codec.decode(reply.data, Pong).n == 7


async def test_plain_nats_client_needs_only_a_json_body_on_an_event_subject(
    insecure_settings: Settings,
) -> None:
    """What docs/protocol.md promises a client in another language: no mesh library, no
    headers. Insecure server: on a mesh with identities such a client must sign."""
    settings = insecure_settings
    async with running_agent(echo, settings), await MeshClient.connect(settings, "plain") as client:
        nc = client.transport.nc  # type: ignore[attr-defined]
        rec = await Recorder.start(client.transport, "mesh.T-77.>")
        await nc.publish("mesh.T-77.evt.test.ping", b'{"text": "from go", "n": 77}')
        msgs = await rec.wait_count(2)
        pong = next(m for m in msgs if m.subject == "mesh.T-77.evt.test.pong")
        assert default_codec.decode(pong.data, Pong).n == 77
        assert pong.headers[h.CONVERSATION] == "T-77"
        assert pong.headers[h.TRACEPARENT].startswith("00-")  # the agent started the trace


async def test_logs_carry_trace_span_conversation_and_agent(settings: Settings, client: MeshClient) -> None:
    import io
    import json

    from mesh.observability.logs import configure_logging

    log_agent = Agent("logger")

    @log_agent.handler
    async def on_ping(ping: Ping, ctx: Context) -> Pong:
        ctx.log.info("pinged", n=ping.n)
        return Pong(text="", n=ping.n, pid=0, instance="")

    stream = io.StringIO()
    configure_logging(Settings.load(environ={}), stream=stream, process="test")
    try:
        async with running_agent(log_agent, settings):
            rec = await Recorder.start(client.transport, "mesh.logs1.evt.test.pong")
            await client.send("logger", Ping(text="x", n=3), conversation="logs1")
            [pong] = await rec.wait_count(1)
    finally:
        import structlog

        structlog.reset_defaults()
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    [pinged] = [e for e in events if e["event"] == "pinged"]
    assert pinged["agent"] == "logger"
    assert pinged["conversation_id"] == "logs1"
    assert pinged["trace_id"] == pong.headers[h.TRACEPARENT].split("-")[1]
    assert len(pinged["span_id"]) == 16
    assert pinged["level"] == "info" and pinged["n"] == 3


async def test_msgpack_body_is_decoded(settings: Settings, client: MeshClient) -> None:
    async with running_agent(echo, settings):
        rec = await Recorder.start(client.transport, "mesh.*.evt.test.pong")
        await client.send("echo", Ping(text="packed", n=3), content_type=MSGPACK)
        [msg] = await rec.wait_count(1)
        assert default_codec.decode(msg.data, Pong).text == "packed"


async def test_handoff_keeps_the_reply_target_and_lineage(settings: Settings, client: MeshClient) -> None:
    from sample_agents.relay import Baton, Finished, first, second, third

    async with (
        running_agent(first, settings),
        running_agent(second, settings),
        running_agent(third, settings),
    ):
        rec = await Recorder.start(client.transport, "mesh.hand1.>")
        reply_to = Address.reply("hand1", "me").subject
        await client.publish(Baton(token="t1"), conversation="hand1", reply_to=reply_to)
        msgs = await rec.wait_for(lambda ms: any(m.subject == reply_to for m in ms))
        final = next(m for m in msgs if m.subject == reply_to)
        done = default_codec.decode(final.data, Finished)
        assert [p.split(":")[0] for p in done.path] == ["first", "second", "third"]
        hops = sorted(int(m.headers[h.HOP]) for m in msgs)
        assert hops == [0, 1, 2, 3]
        ids = {m.headers[h.ID] for m in msgs}
        assert all(m.headers[h.CAUSATION] in ids for m in msgs if m.headers[h.HOP] != "0")


bad_agent = Agent("strict", description="dead-letter target")


@bad_agent.handler
async def strict_ping(ping: Ping, ctx: Context) -> Pong:
    if ping.text == "boom":
        raise RuntimeError("handler exploded")
    return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)


def _answered(msgs: list[Any]) -> list[int]:
    return sorted(default_codec.decode(m.data, Pong).n for m in msgs)


def _headers(client: MeshClient, conv: str, **extra: str) -> dict[str, str]:
    headers = client.headers("test.ping", 1, conv, Lineage())
    headers.update(extra)
    return headers


@pytest.mark.parametrize(
    ("kind", "data", "header_overrides"),
    [
        ("decode", b"{not json", {}),
        ("validation", b'{"text": 5}', {}),
        ("unknown_type", b'{"text": "x"}', {h.TYPE: "test.nobody_handles_this"}),
        ("decode", b'{"text": "x"}', {h.CONTENT_TYPE: "application/xml"}),
        ("bad_header", b'{"text": "x"}', {h.HOP: "many"}),
        ("hop_limit", b'{"text": "x"}', {h.HOP: "1000"}),
        ("bad_header", b'{"text": "x"}', {h.HOP: "-1000000"}),
        # (a reply target that is nobody's reply space: the verifier refuses it first)
        ("unauthorized", b'{"text": "x"}', {h.REPLY_TO: "$JS.API.STREAM.PURGE.MESH_DLQ"}),
        ("unauthorized", b'{"text": "x"}', {h.REPLY_TO: "mesh.c.agent.*"}),
        ("deadline_expired", b'{"text": "x"}', {h.DEADLINE: str(int(time.time() * 1000) - 1000)}),
        ("handler_error", b'{"text": "boom"}', {}),
        ("oversize", b'{"text": "' + b"x" * (2 << 20) + b'"}', {}),
        # values that would end up in a subject or a key the agent publishes to
        ("bad_header", b'{"text": "x"}', {h.ID: "i" * 10_000}),
        ("bad_header", b'{"text": "x"}', {h.ROUTE: "r" * 10_000}),
        ("bad_header", b'{"text": "x"}', {h.ROUTE: "price,Not An Agent"}),
        ("bad_header", b'{"text": "x"}', {h.ROUTE: ",".join(["a"] * 40)}),
        ("bad_header", b'{"text": "x"}', {h.REPLY_TO: "mesh.c.reply." + "t" * 10_000}),
        ("bad_header", b'{"text": "x"}', {h.JOIN: "strict.*/0"}),
        ("bad_header", b'{"text": "x"}', {h.CAUSATION: "c" * 10_000}),
        # (the verifier reads Mesh-Sent-At first: a signed message with a bad one is refused)
        ("unauthenticated", b'{"text": "x"}', {h.SENT_AT: "9" * 5_000}),
        ("bad_header", b'{"text": "x"}', {h.TYPE: "test." + "p" * 200}),
    ],
)
async def test_bad_input_is_dead_lettered_with_bytes_headers_and_reason(
    settings: Settings, client: MeshClient, kind: str, data: bytes, header_overrides: dict[str, str]
) -> None:
    conv = h.new_id()
    async with running_agent(bad_agent, settings):
        dlq = await Recorder.start(client.transport, f"mesh.{conv}.dlq.strict")
        pongs = await Recorder.start(client.transport, f"mesh.{conv}.evt.test.pong")
        inbox = Address.inbox(conv, "strict").subject
        headers = _headers(client, conv, **header_overrides)
        # good traffic before and after the bad message keeps flowing
        await client.send("strict", Ping(text="ok", n=1), conversation=conv)
        await client.send_raw(inbox, data, headers)
        await client.send("strict", Ping(text="ok", n=2), conversation=conv)
        [dead] = await dlq.wait_count(1)
        assert dead.data == data
        assert dead.headers[h.DLQ_KIND] == kind
        assert dead.headers[h.DLQ_SUBJECT] == inbox
        assert dead.headers[h.DLQ_AGENT] == "strict"
        assert dead.headers[h.DLQ_REASON]
        assert dead.headers["Mesh-Dlq-Orig-Nats-Msg-Id"] == headers[h.NATS_MSG_ID]
        assert dead.headers[h.NATS_MSG_ID] != headers[h.NATS_MSG_ID]  # the letter's own
        for name, value in headers.items():
            if name != h.NATS_MSG_ID:
                assert dead.headers[name] == value
        assert _answered(await pongs.wait_count(2)) == [1, 2]
        # the dead letter is stored, not only published
        js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
        stored = await _stored(js, settings.dead_letter_stream, dead.subject)
        assert stored.data == data
        assert stored.headers[h.DLQ_KIND] == kind


async def test_dead_letter_reason_names_the_problem(settings: Settings, client: MeshClient) -> None:
    async with running_agent(bad_agent, settings):
        dlq = await Recorder.start(client.transport, "mesh.*.dlq.strict")
        await client.send_raw(
            Address.inbox("dlq2", "strict").subject, b'{"text": 5}', _headers(client, "dlq2")
        )
        [dead] = await dlq.wait_count(1)
        assert "Expected `str`, got `int`" in dead.headers[h.DLQ_REASON]
        assert "$.text" in dead.headers[h.DLQ_REASON]


async def test_garbage_burst_never_stops_the_agent(settings: Settings, client: MeshClient) -> None:
    """Random bytes and random headers interleaved with good messages: every good one is handled."""
    import random

    rnd = random.Random(7)
    async with running_agent(bad_agent, settings) as runtime:
        dlq = await Recorder.start(client.transport, "mesh.fuzz.dlq.strict")
        pongs = await Recorder.start(client.transport, "mesh.fuzz.evt.test.pong")
        inbox = Address.inbox("fuzz", "strict").subject
        bad = 0
        for i in range(200):
            if i % 4 == 0:
                await client.send("strict", Ping(text="ok", n=i), conversation="fuzz")
            else:
                blob = rnd.randbytes(rnd.randint(0, 64))
                headers = {h.TYPE: rnd.choice(["test.ping", "x.y", ""]) or "test.ping"}
                if rnd.random() < 0.3:
                    headers[h.HOP] = rnd.choice(["-1", "1e9", "zz"])
                await client.send_raw(inbox, blob, headers)
                bad += 1
        assert _answered(await pongs.wait_count(50, timeout=20)) == list(range(0, 200, 4))
        assert len(await dlq.wait_count(bad, timeout=20)) == bad
        async with asyncio.timeout(10):  # an answer can overtake the counter that follows it
            while runtime.stats.handled < 50:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert (runtime.stats.handled, runtime.stats.dead_lettered) == (50, bad)


async def _stored(js: Any, stream: str, subject: str) -> Any:
    """The stream stores a message a moment after subscribers see it; poll until it is there."""
    from nats.js.errors import NotFoundError

    async with asyncio.timeout(5):
        while True:
            try:
                return await js.get_last_msg(stream, subject)
            except NotFoundError:
                await asyncio.sleep(0.02)


def test_messages_encode_like_their_fields() -> None:
    raw = msgspec.json.encode(Ping(text="a", n=2))
    assert msgspec.json.decode(raw) == {"text": "a", "n": 2}


async def test_content_type_parameters_are_accepted(settings: Settings, client: MeshClient) -> None:
    async with running_agent(echo, settings):
        rec = await Recorder.start(client.transport, "mesh.ctype.evt.test.pong")
        headers = client.headers("test.ping", 1, "ctype", content_type="Application/JSON; charset=utf-8")
        await client.send_raw("mesh.ctype.agent.echo", b'{"text": "t", "n": 4}', headers)
        [msg] = await rec.wait_count(1)
        assert default_codec.decode(msg.data, Pong).n == 4


async def test_a_bad_conversation_token_is_rejected_up_front(settings: Settings, client: MeshClient) -> None:
    async with running_agent(bad_agent, settings):
        dlq = await Recorder.start(client.transport, "mesh.*.dlq.strict")
        await client.send_raw("mesh.bad+conv.agent.strict", b'{"text": "x"}', _headers(client, "bad"))
        [dead] = await dlq.wait_count(1)
        assert dead.headers[h.DLQ_KIND] == "bad_subject"


async def test_a_deadline_set_by_the_publisher_stops_late_work(
    settings: Settings, client: MeshClient
) -> None:
    async with running_agent(bad_agent, settings):
        dlq = await Recorder.start(client.transport, "mesh.late.dlq.strict")
        await client.send("strict", Ping(text="late"), conversation="late", deadline=-1.0)
        [dead] = await dlq.wait_count(1)
        assert dead.headers[h.DLQ_KIND] == "deadline_expired"
        assert int(dead.headers[h.DEADLINE]) < time.time() * 1000


async def test_direct_handlers_cut_off_by_the_drain_timeout_are_dead_lettered(
    settings: Settings, client: MeshClient
) -> None:
    stuck = Agent("stuck")
    started = asyncio.Event()

    @stuck.handler
    async def forever(ping: Ping) -> None:
        started.set()
        await asyncio.sleep(60)

    async with running_agent(stuck, settings) as runtime:
        dlq = await Recorder.start(client.transport, "mesh.stuck.dlq.stuck")
        await client.send("stuck", Ping(text="zzz"), conversation="stuck", durable=False)
        await asyncio.wait_for(started.wait(), 5)
        await runtime.stop(timeout=0.1)
        [dead] = await dlq.wait_count(1)
        assert dead.headers[h.DLQ_KIND] == "drain_timeout"
        assert b"zzz" in dead.data


async def test_jetstream_control_headers_cannot_stop_a_dead_letter_being_stored(
    settings: Settings, client: MeshClient
) -> None:
    async with running_agent(bad_agent, settings):
        dlq = await Recorder.start(client.transport, "mesh.jsh.dlq.strict")
        headers = {**_headers(client, "jsh"), "Nats-Expected-Stream": "ELSEWHERE", "Nats-Rollup": "all"}
        # (sent to the direct line: the inbox stream itself would refuse these headers)
        await client.send_raw("mesh.jsh.direct.strict", b"{broken", headers)
        [dead] = await dlq.wait_count(1)
        assert dead.headers["Mesh-Dlq-Orig-Nats-Expected-Stream"] == "ELSEWHERE"
        assert [k for k in dead.headers if k.startswith("Nats-")] == [h.NATS_MSG_ID]  # its own only
        js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
        stored = await _stored(js, settings.dead_letter_stream, dead.subject)
        assert stored.data == b"{broken"


async def test_a_saturated_agent_still_stops_within_its_drain_timeout(
    settings: Settings, client: MeshClient
) -> None:
    """Concurrency 1, a handler that never finishes, two more direct deliveries queued behind
    it: stop() returns promptly and all three messages are dead-lettered, none lost."""
    busy = Agent("busy", concurrency=1)
    started = asyncio.Event()

    @busy.handler
    async def forever(ping: Ping) -> None:
        started.set()
        await asyncio.sleep(60)

    async with running_agent(busy, settings) as runtime:
        dlq = await Recorder.start(client.transport, "mesh.busy.dlq.busy")
        for n in range(3):
            await client.send("busy", Ping(text="q", n=n), conversation="busy", durable=False)
        await asyncio.wait_for(started.wait(), 5)
        await client.transport.flush()
        await asyncio.wait_for(runtime.stop(timeout=0.5), 15)
        dead = await dlq.wait_count(3)
        assert {m.headers[h.DLQ_KIND] for m in dead} == {"drain_timeout"}
        assert sorted(msgspec.json.decode(m.data)["n"] for m in dead) == [0, 1, 2]


async def test_stored_work_cut_off_by_the_drain_goes_back_to_the_stream(
    settings: Settings, client: MeshClient
) -> None:
    """Durable deliveries that a stopping replica cannot finish are handed back at once (not
    dead-lettered, not held for MESH_ACK_WAIT): the next replica handles every one."""
    release, entered, all_done = asyncio.Event(), asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    def build() -> Agent:
        slow = Agent("handback", concurrency=1)

        @slow.handler
        async def on_ping(ping: Ping) -> None:
            entered.set()
            if not release.is_set():
                await asyncio.sleep(60)
            handled.append(ping.n)
            if len(handled) == 3:
                all_done.set()

        return slow

    async with running_agent(build(), settings) as first:
        for n in range(3):
            await client.send("handback", Ping(text="q", n=n), conversation="handback")
        await asyncio.wait_for(entered.wait(), 5)
        await asyncio.wait_for(first.stop(timeout=0.2), 15)
    release.set()
    async with running_agent(build(), settings) as second:
        await asyncio.wait_for(all_done.wait(), 4)  # inside MESH_ACK_WAIT: handed back, not timed out
        assert sorted(handled) == [0, 1, 2]
        assert second.stats.dead_lettered == 0


async def test_watchdog_notices_a_connection_that_stopped_reading(settings: Settings) -> None:
    """If nats-py's read loop ends while the client still reports itself connected, the
    watchdog must turn that silence into an error instead of a deaf agent."""
    from mesh.agent.serving import _watch_connection
    from mesh.transport.nats import NatsTransport
    from mesh.wire.errors import ServerError

    async def answer(msg: Any) -> None:
        await victim.publish(msg.reply, b"pong")

    victim = await NatsTransport.connect(with_role(settings, "operator"), "victim")
    try:
        await victim.subscribe("probe.victim", answer)
        stop = asyncio.Event()
        watching = asyncio.create_task(_watch_connection(victim, stop, "probe.victim", every=0.2))
        await asyncio.sleep(0.5)  # a healthy connection answers its probe: the watchdog stays quiet
        assert not watching.done()
        victim.nc._reading_task.cancel()  # the read loop is gone; the socket stays open
        with pytest.raises(ServerError, match="stopped reading"):
            await asyncio.wait_for(watching, 10)
        assert stop.is_set()
    finally:
        await victim.nc.close()


async def test_watchdog_stops_at_once_when_the_server_closes_the_connection(settings: Settings) -> None:
    """nats-server answers a control line over 4 KiB with -ERR and closes the connection, and
    nats-py then never reconnects: the process must stop (and exit non-zero), not idle deaf."""
    from mesh.agent.serving import _watch_connection
    from mesh.transport.nats import NatsTransport

    victim = await NatsTransport.connect(with_role(settings, "operator"), "victim")
    try:
        stop = asyncio.Event()
        watching = asyncio.create_task(_watch_connection(victim, stop, "probe.none", every=30))
        await victim.nc.publish("mesh." + "x" * 5000 + ".agent.a", b"")  # past the transport's check
        await asyncio.wait_for(watching, 10)
        assert stop.is_set() and victim.closed.is_set()
    finally:
        await victim.nc.close()


async def test_a_subject_that_is_not_utf8_is_dead_lettered_and_the_agent_keeps_working(
    settings: Settings, client: MeshClient
) -> None:
    """nats-py decodes subjects strictly, and the error ends its read loop: one such message
    would leave every replica it reaches connected and deaf."""
    agent = Agent("victim")
    got = asyncio.Event()

    @agent.handler
    async def on_ping(msg: Ping, ctx: Context) -> None:
        if msg.text == "still here":
            got.set()

    dlq = await Recorder.start(client.transport, "mesh.*.dlq.victim")
    async with running_agent(agent, settings):
        host, port = (settings.nats_url or "").removeprefix("nats://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        info = await reader.readline()
        hdrs = b"NATS/1.0\r\nMesh-Type: test.ping\r\n\r\n"
        body = b'{"text":"x"}'
        writer.write(
            raw_connect(info, with_role(settings, "publisher"), verbose=False, headers=True)
            + b"HPUB mesh.\xff\xfe.direct.victim %d %d\r\n" % (len(hdrs), len(hdrs) + len(body))
            + hdrs
            + body
            + b"\r\nPING\r\n"
        )
        await writer.drain()
        await reader.readline()  # PONG: the server has routed the message
        writer.close()
        letters = await dlq.wait_count(1)
        # unsigned (what signs a subject that is not text?): refused before anything else
        assert letters[0].headers[h.DLQ_KIND] == "unauthenticated"
        assert letters[0].subject == "mesh._.dlq.victim"
        await client.send("victim", Ping(text="still here"), durable=False)
        await asyncio.wait_for(got.wait(), 10)
    await dlq.stop()


@pytest.fixture
def acks_lost_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first acknowledgement of each stored message is lost: the server delivers the
    message again, as after a broker crash, after the handler ran to the end."""
    from mesh.transport.consumer import Stored

    lost: set[str] = set()
    real = Stored.ack

    async def ack(self: Stored) -> None:
        if self.origin not in lost:
            lost.add(self.origin)
            await self.nak()
            return
        await real(self)

    monkeypatch.setattr(Stored, "ack", ack)


async def test_a_handled_message_delivered_again_is_acknowledged_without_running_it(
    settings: Settings, client: MeshClient, acks_lost_once: None
) -> None:
    """Whatever it sent (an event here, stored; an answer to a requester, not stored), its
    processed record stops a second run; and what it sent was stored before the record."""
    reply_to = Address.reply("again-2", "t").subject
    async with running_agent(echo, settings) as runtime:
        tap = await Recorder.start(client.transport, "mesh.*.>")
        acks = await Recorder.start(client.transport, "$JS.ACK.MESH_INBOX.echo.>")
        await client.send("echo", Ping(text="again", n=1), conversation="again-1")
        await client.send("echo", Ping(text="again", n=2), conversation="again-2", reply_to=reply_to)
        await acks.wait_count(4)  # each: the lost acknowledgement, then the one that counts
        stats = runtime.stats
    js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
    info = await js.stream_info("MESH_EVENTS", subjects_filter="mesh.again-1.evt.test.pong")
    assert info.state.subjects == {"mesh.again-1.evt.test.pong": 1}
    answers = [
        m.subject for m in tap.messages if m.subject.startswith("mesh.again-") and ".agent." not in m.subject
    ]
    assert sorted(answers) == ["mesh.again-1.evt.test.pong", reply_to]  # one run each
    assert (stats.handled, stats.duplicates) == (2, 2)
