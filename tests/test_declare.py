"""`mesh agents add` declares an agent's consumers before it first runs, and `mesh publish`
says when no running agent gets what it published, and where it waits."""

from __future__ import annotations

import subprocess

from conftest import SAMPLES, mesh_cli
from sample_agents.ledger import InvoiceBooked, agent

from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.transport import streams
from mesh.wire.codec import default_codec
from mesh.wire.settings import Settings
from mesh.wire.subjects import matches

LEDGER = str(SAMPLES / "ledger.py")


async def _publish(settings: Settings, invoice: str) -> subprocess.CompletedProcess[str]:
    body = f'{{"invoice": "{invoice}"}}'
    done = await mesh_cli(
        settings, "publish", "test.invoice_paid", body, "--conversation", invoice, "--types", LEDGER
    )
    assert done.returncode == 0, done.stderr
    return done


async def test_events_reach_an_agent_declared_before_its_first_start(
    settings: Settings, client: MeshClient
) -> None:
    booked = await Recorder.start(client.transport, "mesh.*.evt.test.invoice_booked")

    # before any consumer exists: stored, but no agent will ever get it
    lost = await _publish(settings, "inv-lost")
    assert "warning: no agent handles test.invoice_paid" in lost.stderr
    assert "MESH_EVENTS" in lost.stderr and "mesh agents add" in lost.stderr

    added = await mesh_cli(settings, "agents", "add", f"{LEDGER}:agent")
    assert added.returncode == 0, added.stderr
    assert "MESH_EVENTS  created   mesh.*.evt.test.invoice_paid" in added.stdout
    events = await client.transport.consumer_info(streams.EVENTS, "ledger")
    assert events.num_pending == 0  # the event published before the declaration is not for it

    waiting = await _publish(settings, "inv-waits")
    assert "no agent that handles test.invoice_paid is running" in waiting.stderr
    assert "waits in MESH_EVENTS for ledger" in waiting.stderr
    again = await mesh_cli(settings, "agents", "add", f"{LEDGER}:agent")
    assert "MESH_EVENTS  kept" in again.stdout  # declaring twice changes nothing

    async with running_agent(agent, settings):
        live = await _publish(settings, "inv-live")
        assert "warning" not in live.stderr
        await booked.wait_count(2)
    invoices = sorted(default_codec.decode(m.data, InvoiceBooked).invoice for m in booked.messages)
    assert invoices == ["inv-live", "inv-waits"]
    events = await client.transport.consumer_info(streams.EVENTS, "ledger")
    assert events.num_pending == 0 and events.num_ack_pending == 0  # "inv-lost" never comes


async def test_publish_to_an_agent_that_never_ran_says_where_the_message_waits(settings: Settings) -> None:
    await mesh_cli(settings, "agents", "add", f"{LEDGER}:agent")
    body = '{"invoice": "inv-typo"}'
    typed = ("--type", "test.invoice_paid", "--types", LEDGER, "--conversation", "inv-typo")
    sent = await mesh_cli(settings, "publish", "agent:ledgr", body, *typed)
    assert sent.returncode == 0, sent.stderr
    assert "no agent named 'ledgr' has run on this server or been declared" in sent.stderr
    assert "waits in MESH_INBOX" in sent.stderr
    assert "Did you mean `agent:ledger`?" in sent.stderr
    assert "`nats stream purge MESH_INBOX --subject mesh.inv-typo.agent.ledgr`" in sent.stderr

    stopped = await mesh_cli(settings, "publish", "agent:ledger", body, *typed)
    assert "no replica of agent 'ledger' is running: the message waits in MESH_INBOX" in stopped.stderr


async def test_agents_add_by_name_needs_the_event_types(settings: Settings) -> None:
    bare = await mesh_cli(settings, "agents", "add", "billing")
    assert bare.returncode == 2
    assert "mesh agents add billing --events TYPE" in bare.stderr
    bad = await mesh_cli(settings, "agents", "add", "billing", "--events", "Invoice Paid")
    assert bad.returncode == 2 and "not a message type name" in bad.stderr
    named = await mesh_cli(settings, "agents", "add", "billing", "--events", "test.refund_asked,test.refund")
    assert named.returncode == 0, named.stderr
    assert "mesh.*.evt.test.refund, mesh.*.evt.test.refund_asked" in named.stdout
    typo = await mesh_cli(settings, "agents", "ad", "billing")
    assert typo.returncode == 2
    assert "Did you mean `mesh agents add`?" in typo.stderr


def test_subject_patterns_match_as_nats_matches_them() -> None:
    assert matches("mesh.*.evt.a.b", "mesh.c1.evt.a.b")
    assert not matches("mesh.*.evt.a", "mesh.c1.evt.a.b")
    assert matches("mesh.*.evt.>", "mesh.c1.evt.a.b")
    assert not matches("mesh.*.evt.>", "mesh.c1.evt")
    assert not matches("mesh.*.evt.a.b", "mesh.c1.evt.a")
