"""`mesh dlq`: listing dead letters and re-driving one to the agent that gave up on it;
`mesh agents` showing what waits in an agent's queues."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import stored_dead_letters
from sample_agents.echo import Ping, Pong

from mesh import Agent, Context
from mesh.cli.dlq import left_out, list_dead_letters, redrive, redrive_headers
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import backlog
from mesh.runtime.retries import Failures, on_max_deliveries
from mesh.testing import Recorder, running_agent
from mesh.transport import streams
from mesh.transport.identities import with_role
from mesh.transport.keys import signer_of
from mesh.transport.streams import bucket_specs
from mesh.wire import envelope as h
from mesh.wire.settings import Settings


@pytest.fixture
def client(operator: MeshClient) -> MeshClient:
    """Listing, re-driving and purging dead letters take the operator role, as `mesh dlq` has."""
    return operator


healed = False
moody = Agent("moody", description="fails until healed")


@moody.handler
async def on_ping(ping: Ping, ctx: Context) -> Pong:
    if not healed:
        raise RuntimeError("not today")
    return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_NATS_URL": settings.nats_url or "", "MESH_DATA_DIR": str(settings.data_dir)})
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args], env=env, capture_output=True, text=True, timeout=60
    )


async def test_a_dead_letter_is_listed_and_redriven_once_the_cause_is_fixed(
    settings: Settings, client: MeshClient
) -> None:
    global healed
    healed = False
    async with running_agent(moody, settings):
        dlq = await Recorder.start(client.transport, "mesh.dlq-redrive.dlq.moody")
        sent = await client.send("moody", Ping(text="again", n=9), conversation="dlq-redrive", deadline=60)
        [dead] = await dlq.wait_count(1)
        assert dead.headers[h.DLQ_DELIVERIES] == str(settings.max_deliver)

        [letter] = await stored_dead_letters(client.transport, settings.dead_letter_stream, "dlq-redrive")
        assert (letter.agent, letter.kind, letter.message_id) == ("moody", "handler_error", sent.id)
        listed = _cli(settings, "dlq", "ls", "--conversation", "dlq-redrive", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["seq"] == letter.seq
        shown = _cli(settings, "dlq", "show", str(letter.seq))
        assert "Mesh-Dlq-Reason: on_ping raised RuntimeError: not today" in shown.stdout

        healed = True
        pongs = await Recorder.start(client.transport, "mesh.dlq-redrive.evt.test.pong")
        again = await Recorder.start(client.transport, "mesh.dlq-redrive.agent.moody")
        signer = signer_of(with_role(settings, "operator"))  # as `mesh dlq redrive` signs it
        done = await redrive(client.transport, settings.dead_letter_stream, letter.seq, signer=signer)  # type: ignore[arg-type]
        assert (done.subject, done.without) == ("mesh.dlq-redrive.agent.moody", ())
        [pong] = await pongs.wait_count(1)
        # the same body, handled now: sent again by the operator, saying whose it was
        [back] = await again.wait_count(1)
        assert (back.data, back.headers[h.REDRIVEN_FROM]) == (dead.data, client.sender)
        assert pong.headers[h.CAUSATION] == back.headers[h.ID]
        remaining = await list_dead_letters(
            client.transport,  # type: ignore[arg-type]
            settings.dead_letter_stream,
            conversation="dlq-redrive",
        )
        assert remaining == []


def test_redrive_restores_the_original_headers_with_a_new_dedupe_id() -> None:
    dead = {
        h.ID: "m1",
        h.TYPE: "test.ping",
        h.DEADLINE: "1",
        "Mesh-Dlq-Orig-Nats-Msg-Id": "m1",
        "Mesh-Dlq-Orig-Nats-Expected-Stream": "X",
        h.DLQ_KIND: "deadline_expired",
        h.DLQ_REASON: "late",
    }
    out = redrive_headers(dead)
    assert out[h.ID] == "m1" and out[h.TYPE] == "test.ping"
    assert out["Nats-Expected-Stream"] == "X"
    assert out[h.NATS_MSG_ID] != "m1"
    assert h.DEADLINE not in out and not any(k.startswith("Mesh-Dlq-") for k in out)


def test_redriving_an_unknown_dead_letter_says_how_to_find_one(settings: Settings) -> None:
    result = _cli(settings, "dlq", "redrive", "999999")
    assert result.returncode == 2
    assert "mesh dlq ls" in result.stderr


async def test_agents_shows_what_waits_in_a_stopped_agents_queue(
    settings: Settings, client: MeshClient
) -> None:
    global healed
    healed = True
    async with running_agent(moody, settings):
        pass  # its consumers now exist; nobody is taking from them
    before = await backlog(client.transport, "moody")
    for n in range(5):
        await client.send("moody", Ping(text="queued", n=n), conversation="dlq-backlog")
    after = await backlog(client.transport, "moody")
    assert after["pending"] - before["pending"] == 5
    pongs = await Recorder.start(client.transport, "mesh.dlq-backlog.evt.test.pong")
    async with running_agent(moody, settings):
        await pongs.wait_count(5)


payment_fixed = False
payments = Agent("payments", description="fails in German until fixed")


@payments.handler
async def on_payment(ping: Ping, ctx: Context) -> Pong:
    if not payment_fixed:
        raise RuntimeError("Zahlung für Kunde 4 fehlgeschlagen")
    return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)


async def test_the_dlq_tools_read_headers_that_are_not_ascii(settings: Settings, client: MeshClient) -> None:
    # nats-py's JetStream message API hands such a value back as an email.header.Header
    global payment_fixed
    payment_fixed = False
    reason = "on_payment raised RuntimeError: Zahlung für Kunde 4 fehlgeschlagen (delivery 3)"
    async with running_agent(payments, settings):
        dlq = await Recorder.start(client.transport, "mesh.dlq-umlaut.dlq.payments")
        # an outside system's own header, not ASCII either; a dead letter keeps it
        headers = {**client.headers("test.ping", 1, "dlq-umlaut"), "Kunde": "Müller"}
        inbox = "mesh.dlq-umlaut.agent.payments"
        await client.send_raw(inbox, b'{"text": "pay", "n": 4}', headers, store=True)
        await dlq.wait_count(1)

        listed = _cli(settings, "dlq", "ls", "--conversation", "dlq-umlaut")
        assert listed.returncode == 0, listed.stderr
        assert "Zahlung für Kunde 4" in listed.stdout
        as_json = _cli(settings, "dlq", "ls", "--conversation", "dlq-umlaut", "--json")
        assert as_json.returncode == 0, as_json.stderr
        letter = json.loads(as_json.stdout)
        assert (letter["reason"], letter["message_id"]) == (reason, headers[h.ID])
        shown = _cli(settings, "dlq", "show", str(letter["seq"]))
        assert shown.returncode == 0, shown.stderr
        assert f"Mesh-Dlq-Reason: {reason}" in shown.stdout
        assert "Kunde: Müller" in shown.stdout

        payment_fixed = True
        pongs = await Recorder.start(client.transport, "mesh.dlq-umlaut.evt.test.pong")
        again = await Recorder.start(client.transport, inbox)
        redriven = _cli(settings, "dlq", "redrive", str(letter["seq"]))
        assert redriven.returncode == 0, redriven.stderr
        [back] = await again.wait_count(1)
        assert back.headers["Kunde"] == "Müller"
        [pong] = await pongs.wait_count(1)
        # a new message from the operator, which answers for it (`mesh.cli.dlq.redrive`)
        assert (back.headers[h.REDRIVEN_FROM], back.headers[h.SENDER]) == (client.sender, "operator")
        assert pong.headers[h.CAUSATION] == back.headers[h.ID]
        assert _cli(settings, "dlq", "ls", "--conversation", "dlq-umlaut", "--json").stdout == ""


async def test_a_message_the_server_gave_up_on_is_dead_lettered_with_its_non_ascii_headers(
    settings: Settings, client: MeshClient
) -> None:
    # what an agent does on the server's max-deliveries advisory: read the message back
    # from the stream and store it as a dead letter
    headers = {**client.headers("test.ping", 1, "dlq-gave-up"), "Kunde": "Müller"}
    seq = await client.send_raw("mesh.dlq-gave-up.agent.stuck", b"{}", headers, store=True)
    state = await client.transport.state(bucket_specs(settings)[1], settings)
    dlq = await Recorder.start(client.transport, "mesh.dlq-gave-up.dlq.stuck")
    advisory = json.dumps({"stream": streams.INBOX, "stream_seq": seq, "deliveries": 4}).encode()
    await on_max_deliveries(client.transport, Failures(state, "stuck", "i1"), "stuck", advisory)
    [dead] = await dlq.wait_count(1)
    assert (dead.headers["Kunde"], dead.headers[h.DLQ_KIND]) == ("Müller", "max_deliveries")


SECRETS = {
    "Authorization": "Bearer sk-live-123",
    "Cookie": "session=abc",
    "X-Api-Key": "key-456",
    "X-Refresh-Token": "tok-789",
    "X-Tenant-Pin": "4321",  # secret only because MESH_SECRET_HEADERS names it
}


async def test_a_dead_letter_keeps_no_secret_header_and_a_redrive_does_not_bring_one_back(
    settings: Settings, client: MeshClient
) -> None:
    mine = settings.model_copy(update={"secret_headers": "X-Tenant-Pin"})
    async with running_agent(moody, mine):
        dlq = await Recorder.start(client.transport, "mesh.dlq-secret.dlq.moody")
        inbox = "mesh.dlq-secret.agent.moody"
        headers = {**client.headers("test.ping", 1, "dlq-secret"), **SECRETS, "Kunde": "Müller"}
        await client.send_raw(inbox, b"{not json", headers, store=True)
        [dead] = await dlq.wait_count(1)
        assert dead.headers[h.DLQ_KIND] == "decode"
        assert dead.headers[h.DLQ_MASKED] == "Authorization,Cookie,X-Api-Key,X-Refresh-Token,X-Tenant-Pin"
        assert not set(SECRETS) & set(dead.headers)
        assert dead.headers["Kunde"] == "Müller"  # other headers are kept

        [letter] = await stored_dead_letters(client.transport, settings.dead_letter_stream, "dlq-secret")
        shown = _cli(settings, "dlq", "show", str(letter.seq))
        assert shown.returncode == 0, shown.stderr
        assert not any(value in shown.stdout for value in SECRETS.values())

        again = await Recorder.start(client.transport, inbox)
        redriven = _cli(settings, "dlq", "redrive", str(letter.seq))
        assert redriven.returncode == 0, redriven.stderr
        assert "without its secret headers Authorization, Cookie, X-Api-Key" in redriven.stdout
        [back] = await again.wait_count(1)
        assert not set(SECRETS) & set(back.headers)
        assert h.DLQ_MASKED not in back.headers
        second = (await dlq.wait_count(2))[1]  # still not JSON: dead-lettered again, nothing to mask
        assert h.DLQ_MASKED not in second.headers


async def test_a_letter_published_by_hand_is_redriven_without_its_secret_headers(
    settings: Settings, client: MeshClient
) -> None:
    # anyone who may publish on a dead-letter subject can forge a letter for an operator to re-drive
    forged = {
        **client.headers("test.ping", 1, "dlq-forged"),
        h.DLQ_KIND: "handler_error",
        h.DLQ_AGENT: "forged-target",
        **SECRETS,
    }
    seq = await client.send_raw("mesh.dlq-forged.dlq.forged-target", b"{}", forged, store=True)
    inbox = await Recorder.start(client.transport, "mesh.dlq-forged.agent.forged-target")
    env = {"MESH_SECRET_HEADERS": "X-Tenant-Pin"}
    redriven = _cli_env(settings, env, "dlq", "redrive", str(seq))
    assert redriven.returncode == 0, redriven.stderr
    [back] = await inbox.wait_count(1)
    assert not set(SECRETS) & set(back.headers)
    assert "X-Tenant-Pin" in redriven.stdout


def test_redrive_leaves_out_secret_headers_and_says_which() -> None:
    letter = {h.ID: "m1", h.DLQ_MASKED: "Authorization", "X-Session-Key": "v", "Kunde": "x"}
    out = redrive_headers(letter, frozenset({"x-session-key"}))
    assert set(out) == {h.ID, "Kunde", h.NATS_MSG_ID}
    assert left_out(letter, frozenset({"x-session-key"})) == ("Authorization", "X-Session-Key")


def _cli_env(settings: Settings, more: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_NATS_URL": settings.nats_url or "", "MESH_DATA_DIR": str(settings.data_dir), **more})
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args], env=env, capture_output=True, text=True, timeout=60
    )
