"""The support desk of `mesh demo`, started over HTTP: a signed webhook opens a ticket through
the gateway, the writer's streamed reply comes back over server-sent events, and the
conversation's status and result over the status endpoint. The desk's agents run in this
process on the session's server (auth on), with the offline model and the embedded Qdrant."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import served

from mesh.agent.loader import load_agent
from mesh.cli.demo import AGENT_SPECS, TICKETS
from mesh.gateway.app import Gateway
from mesh.gateway.auth import GatewayAuth, sign
from mesh.testing import running_agent
from mesh.transport.identities import with_role
from mesh.wire.settings import Settings

pytestmark = pytest.mark.slow

SECRET = b"helpdesk-webhook-secret-0123456789"
TOKEN = "t0ken-of-the-support-dashboard-42"


@pytest.fixture
async def desk(settings: Settings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway, in-process, with the support desk's agents running behind it."""
    import mesh.schemas.support  # noqa: F401  # the desk's message types, as `--types` gives them

    tokens, secrets = tmp_path / "tokens", tmp_path / "secrets"
    tokens.write_text(f"dashboard={TOKEN}\n")
    secrets.write_text(f"helpdesk={SECRET.decode()}\n")
    gw = Gateway(with_role(settings, "publisher"), GatewayAuth.load(tokens, secrets, environ={}))
    async with AsyncExitStack() as stack:
        for spec in AGENT_SPECS.values():
            await stack.enter_async_context(running_agent(load_agent(spec), settings))
        await gw.start()
        stack.push_async_callback(gw.close)
        base = await stack.enter_async_context(served(gw.app))  # on loopback: events stream
        yield await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))


async def test_a_signed_webhook_opens_a_ticket_and_the_streamed_reply_comes_back_over_http(
    desk: httpx.AsyncClient,
) -> None:
    ticket = next(t for t in TICKETS if t["ticket_id"] == "T-1002")  # no refund: no approval to wait for
    raw = json.dumps(ticket).encode()
    signed = {"X-Hub-Signature-256": "sha256=" + sign(SECRET, raw), "Content-Type": "application/json"}
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    r = await desk.post("/v1/events/support.ticket_opened?source=helpdesk", content=raw, headers=signed)
    assert r.status_code == 202, r.text
    conversation = r.json()["conversation"]

    # follow it over server-sent events: what is recorded, then live, streamed tokens included
    chunks: list[str] = []
    types: list[str] = []
    reply: dict[str, Any] = {}
    event = ""
    async with (
        asyncio.timeout(60),
        desk.stream("GET", f"/v1/conversations/{conversation}/events", headers=bearer) as sse,
    ):
        assert sse.status_code == 200
        async for line in sse.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                types.append(event)
                if event == "llm.chunk":
                    chunks.append(data["body"]["text"])
                elif event == "support.reply_drafted":
                    reply = data["body"]
                    break
    assert types[0] == "support.ticket_opened"
    assert {"support.research_request", "support.research_findings"} <= set(types)
    assert len(chunks) > 1, "the writer's reply was not streamed"
    assert "".join(chunks).strip() and "".join(chunks).strip() in reply["reply"]
    assert reply["ticket_id"] == "T-1002"

    # the status endpoint: the conversation done, its result the drafted reply
    status: dict[str, Any] = {}
    async with asyncio.timeout(30):
        while status.get("status") != "done":
            status = (await desk.get(f"/v1/conversations/{conversation}", headers=bearer)).json()
            await asyncio.sleep(0.05)
    assert {"triage", "research", "writer"} <= set(status["agents"])
    assert status["result"]["type"] == "support.reply_drafted"
    assert status["result"]["body"]["reply"] == reply["reply"]
