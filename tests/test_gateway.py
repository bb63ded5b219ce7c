"""The HTTP gateway (mesh.gateway, `mesh gateway`) on a real server with auth on: the app is
driven in-process over httpx's ASGI transport, acting on the mesh as the publisher role."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import TESTS
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sample_agents.echo import Ping, Pong
from sample_agents.echo import agent as echo
from test_metrics import free_port, samples, scrape_until, value

from mesh import Agent, Context
from mesh.gateway.app import Gateway
from mesh.gateway.auth import GatewayAuth, sign
from mesh.gateway.wire import idempotent_ids
from mesh.runtime.client import MeshClient
from mesh.testing import running_agent
from mesh.transport.identities import with_role
from mesh.transport.streams import EVENTS
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

TOKEN = "t0ken-for-the-ci-robot-0123456789"
SECRET = b"github-webhook-secret-abcdef"


@pytest.fixture
async def http(settings: Settings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    tokens, secrets = tmp_path / "tokens", tmp_path / "secrets"
    tokens.write_text(f"# who may call\nci={TOKEN}\n")
    secrets.write_text(f"github={SECRET.decode()}\n")
    gw = Gateway(with_role(settings, "publisher"), GatewayAuth.load(tokens, secrets, environ={}))
    await gw.start()
    try:
        transport = httpx.ASGITransport(app=gw.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as c:
            yield c
    finally:
        await gw.close()


def signed(body: dict[str, Any], secret: bytes = SECRET) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps(body).encode()
    return raw, {"X-Hub-Signature-256": "sha256=" + sign(secret, raw), "Content-Type": "application/json"}


BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def _finished(http: httpx.AsyncClient, conversation: str) -> dict[str, Any]:
    """The conversation's status once it is done or failed (at most 10 s)."""
    got: dict[str, Any] = {}
    for _ in range(200):
        r = await http.get(f"/v1/conversations/{conversation}", headers=BEARER)
        if r.status_code == 200:
            got = r.json()
            if got["status"] in ("done", "failed") and got["result"] is not None:
                return got
        await asyncio.sleep(0.05)
    raise AssertionError(f"conversation {conversation} never finished: {got}")


async def test_a_signed_webhook_starts_a_conversation_whose_result_comes_back_over_http(
    settings: Settings, http: httpx.AsyncClient, spans: InMemorySpanExporter
) -> None:
    raw, headers = signed({"text": "hello from a webhook", "n": 7})
    async with running_agent(echo, settings):
        r = await http.post("/v1/agents/echo?type=test.ping&source=github", content=raw, headers=headers)
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["type"] == "test.ping@1" and accepted["subject"].endswith(".agent.echo")
        assert r.headers["location"] == f"/v1/conversations/{accepted['conversation']}"
        status = await _finished(http, accepted["conversation"])
    assert status["status"] == "done"
    assert "echo" in status["agents"]
    assert status["result"]["type"] == "test.pong"
    assert status["result"]["body"]["text"] == "hello from a webhook"
    assert status["result"]["body"]["n"] == 7
    # the call was a span, and the message it sent carries that span's trace
    calls = [
        s
        for s in spans.get_finished_spans()
        if s.name == "gateway send_to_agent" and s.context is not None
        if format(s.context.trace_id, "032x") in status["trace_ids"]
    ]
    assert len(calls) == 1 and calls[0].attributes is not None
    assert calls[0].attributes["http.response.status_code"] == 202


async def test_a_traced_callers_trace_goes_on_into_the_mesh(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = {**BEARER, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "tracestate": "ci=1"}
    hostile = {**BEARER, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01" + "0" * 100}
    async with running_agent(echo, settings):
        r = await http.post("/v1/agents/echo?type=test.ping", json={"text": "traced"}, headers=traced)
        assert r.status_code == 202, r.text
        status = await _finished(http, r.json()["conversation"])
        bad = await http.post("/v1/agents/echo?type=test.ping", json={"text": "x"}, headers=hostile)
        assert bad.status_code == 202, bad.text
        other = await _finished(http, bad.json()["conversation"])
    assert status["trace_ids"] == [trace_id]  # the caller's, through the agent's answer
    assert other["trace_ids"] and trace_id not in other["trace_ids"]  # too long: a trace of its own


async def test_a_wrong_or_missing_signature_or_token_is_401(http: httpx.AsyncClient) -> None:
    raw, headers = signed({"text": "x"}, secret=b"not-the-secret-at-all-000")
    r = await http.post("/v1/events/test.ping?source=github", content=raw, headers=headers)
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    _, good = signed({"text": "x"})
    tampered = json.dumps({"text": "y"}).encode()  # signed one body, sent another
    assert (
        await http.post("/v1/events/test.ping?source=github", content=tampered, headers=good)
    ).status_code == 401
    raw, headers = signed({"text": "x"})
    unknown_source = await http.post("/v1/events/test.ping?source=gitlab", content=raw, headers=headers)
    assert unknown_source.status_code == 401
    assert (await http.post("/v1/events/test.ping", json={"text": "x"})).status_code == 401
    wrong = {"Authorization": "Bearer " + TOKEN[:-1] + "X"}
    r = await http.post("/v1/events/test.ping", json={"text": "x"}, headers=wrong)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert (await http.get("/v1/conversations/abc", headers=wrong)).status_code == 401


async def test_an_invalid_body_is_422_with_the_field_error(http: httpx.AsyncClient) -> None:
    r = await http.post("/v1/events/test.ping", json={"text": 5}, headers=BEARER)
    assert r.status_code == 422
    assert r.json()["error"] == "invalid_body"
    assert r.json()["errors"] == [{"path": "$.text", "message": "Expected `str`, got `int`"}]
    missing = await http.post("/v1/events/test.ping", json={"n": 1}, headers=BEARER)
    assert missing.status_code == 422 and "text" in missing.json()["errors"][0]["message"]
    r = await http.post("/v1/events/test.ping", content=b"{not json", headers=BEARER)
    assert r.status_code == 422 and r.json()["error"] == "invalid_json"


async def test_hostile_path_values_and_bodies_are_refused(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    r = await http.post("/v1/agents/Bad.Name?type=test.ping", json={"text": "x"}, headers=BEARER)
    assert r.status_code == 400 and r.json()["error"] == "invalid_agent"
    r = await http.post("/v1/events/no.such_type", json={"text": "x"}, headers=BEARER)
    assert r.status_code == 404 and r.json()["error"] == "unknown_type"
    r = await http.post("/v1/events/Test.*", json={"text": "x"}, headers=BEARER)
    assert r.status_code == 400
    r = await http.post("/v1/agents/echo", json={"text": "x"}, headers=BEARER)
    assert r.status_code == 400 and r.json()["error"] == "missing_type"
    bad_key = {**BEARER, "Idempotency-Key": "a b"}
    r = await http.post("/v1/events/test.ping", json={"text": "x"}, headers=bad_key)
    assert r.status_code == 400 and r.json()["error"] == "invalid_idempotency_key"
    big = {"text": "x" * settings.max_message_bytes}
    r = await http.post("/v1/events/test.ping", json=big, headers=BEARER)
    assert r.status_code == 413
    r = await http.get("/v1/conversations/a.b", headers=BEARER)
    assert r.status_code == 400 and r.json()["error"] == "invalid_conversation"


async def test_an_idempotency_key_repeat_gets_the_same_ids_and_the_stream_keeps_one_message(
    http: httpx.AsyncClient, operator: MeshClient
) -> None:
    headers = {**BEARER, "Idempotency-Key": "order-1234:created"}
    first = await http.post("/v1/events/test.ping", json={"text": "once"}, headers=headers)
    again = await http.post("/v1/events/test.ping", json={"text": "once"}, headers=headers)
    other = await http.post(
        "/v1/events/test.ping", json={"text": "once"}, headers={**BEARER, "Idempotency-Key": "order-1235"}
    )
    assert first.status_code == again.status_code == other.status_code == 202
    assert first.json() == again.json()
    assert other.json()["conversation"] != first.json()["conversation"]
    stored = await operator.transport.stored_many(EVENTS, 1, first.json()["subject"])
    assert len(stored) == 1
    assert stored[0].headers["Nats-Msg-Id"] == first.json()["id"]


def stamped(body: dict[str, Any], at: float | None = None, *secrets: bytes) -> tuple[bytes, dict[str, str]]:
    """A body signed as Stripe signs it: t=<unix seconds>,v1=<HMAC of "<t>.<body>"> per secret."""
    raw = json.dumps(body).encode()
    t = int(time.time() if at is None else at)
    v1 = ",".join(f"v1={sign(secret, f'{t}.'.encode() + raw)}" for secret in secrets or (SECRET,))
    return raw, {"Stripe-Signature": f"t={t},{v1}", "Content-Type": "application/json"}


async def test_a_timestamped_signature_is_good_for_five_minutes_and_a_replay_of_it_is_one_message(
    http: httpx.AsyncClient, operator: MeshClient
) -> None:
    url = "/v1/events/test.ping?source=github"
    raw, headers = stamped({"text": "stamped"})
    first = await http.post(url, content=raw, headers=headers)
    replayed = await http.post(url, content=raw, headers=headers)  # captured and sent again
    # ... and again with headers the signature does not cover, to pass for a new delivery
    disguised = {**headers, "Idempotency-Key": "fresh-1", "X-GitHub-Delivery": "fresh-2"}
    dressed = await http.post(url, content=raw, headers=disguised)
    assert first.status_code == replayed.status_code == dressed.status_code == 202, first.text
    assert first.json() == replayed.json() == dressed.json()  # the same delivery: one message
    stored = await operator.transport.stored_many(EVENTS, 1, first.json()["subject"])
    assert [m.headers["Nats-Msg-Id"] for m in stored] == [first.json()["id"]]
    # one good signature among others passes (a secret being rotated), and is the same delivery
    _, both = stamped({"text": "stamped"}, float(headers["Stripe-Signature"][2:12]), b"o" * 20, SECRET)
    again = await http.post(url, content=raw, headers=both)
    assert again.status_code == 202 and again.json() == first.json()
    # a new second is a new delivery (a sender's clock may be a little ahead of ours)
    later = await http.post(url, content=raw, headers=stamped({"text": "stamped"}, time.time() + 20)[1])
    assert later.status_code == 202 and later.json()["id"] != first.json()["id"]
    refused = [
        stamped({"text": "x"}, time.time() - 301)[1],  # too old
        stamped({"text": "x"}, time.time() + 45)[1],  # ahead of our clock by more than 30 s
        stamped({"text": "x"}, None, b"not-the-secret-0123")[1],
        {"Stripe-Signature": "v1=" + "0" * 64},  # no time
        {"Stripe-Signature": f"t={int(time.time())}"},  # no signature
        {"Stripe-Signature": "t=" + "9" * 40 + ",v1=00"},
        {"Stripe-Signature": ",".join(["v1=" + "a" * 64] * 500) + f",t={int(time.time())}"},
        {"Stripe-Signature": "\x00garbage=,=,t=,v1="},
    ]
    for bad in refused:
        r = await http.post(url, content=json.dumps({"text": "x"}).encode(), headers=bad)
        assert r.status_code == 401, (bad, r.text)
    r = await http.post(
        "/v1/events/test.ping?source=nobody", content=raw, headers=stamped({"text": "stamped"})[1]
    )
    assert r.status_code == 401


def test_a_timestamped_signature_is_good_only_while_the_stream_remembers_its_delivery() -> None:
    from mesh.gateway.auth import FUTURE_SKEW, window_for

    auth = GatewayAuth(secrets={"stripe": SECRET})
    raw, headers = stamped({"text": "t"}, 1_000_000)
    signed_at = headers["Stripe-Signature"]
    assert window_for(300) == 270 and window_for(3600) == 300  # never past the dedupe window
    assert auth.timestamped("stripe", signed_at, raw, 1_000_000 + 270, window_for(300)) == "hmac:stripe"
    assert auth.timestamped("stripe", signed_at, raw, 1_000_000 + 271, window_for(300)) is None
    assert auth.timestamped("stripe", signed_at, raw, 1_000_000 - FUTURE_SKEW, 270) == "hmac:stripe"
    assert auth.timestamped("stripe", signed_at, raw, 1_000_000 - FUTURE_SKEW - 1, 270) is None


async def test_a_github_delivery_id_makes_a_redelivery_the_same_message(http: httpx.AsyncClient) -> None:
    raw, headers = signed({"text": "pushed"})
    url = "/v1/events/test.ping?source=github"
    delivery = {**headers, "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958"}
    first = await http.post(url, content=raw, headers=delivery)
    redelivered = await http.post(url, content=raw, headers=delivery)
    other = await http.post(url, content=raw, headers={**headers, "X-GitHub-Delivery": "8d1f-other"})
    plain = await http.post(url, content=raw, headers=headers)
    assert {r.status_code for r in (first, redelivered, other, plain)} == {202}
    assert first.json() == redelivered.json()
    assert len({first.json()["id"], other.json()["id"], plain.json()["id"]}) == 3


async def test_a_request_returns_the_answer_and_a_timeout_is_504(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    async with running_agent(echo, settings):
        r = await http.post(
            "/v1/agents/echo/request?type=test.ping&timeout=5", json={"text": "ask", "n": 2}, headers=BEARER
        )
        assert r.status_code == 200, r.text
        assert r.json()["type"] == "test.pong"
        assert r.json()["body"]["text"] == "ask" and r.json()["body"]["n"] == 2
        slow = {**BEARER, "X-Mesh-Timeout": "0.2"}  # "slow" takes the echo agent a second
        r = await http.post("/v1/agents/echo/request?type=test.ping", json={"text": "slow"}, headers=slow)
        assert r.status_code == 504 and r.json()["error"] == "timeout"
    r = await http.post(
        "/v1/agents/echo/request?type=test.ping&timeout=100", json={"text": "x"}, headers=BEARER
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_timeout"


broken = Agent("gw-broken", description="Fails every ping")


@broken.handler
async def on_ping(ping: Ping, ctx: Context) -> Pong:
    raise RuntimeError("the database is down")


async def test_a_request_the_agent_cannot_handle_is_502_with_the_failure_kind(
    settings: Settings, http: httpx.AsyncClient
) -> None:
    async with running_agent(broken, settings):
        r = await http.post("/v1/agents/gw-broken/request?type=test.ping", json={"text": "x"}, headers=BEARER)
    assert r.status_code == 502, r.text
    assert r.json()["error"] == "handler_error" and r.json()["agent"] == "gw-broken"
    assert "the database is down" in r.json()["detail"]


async def test_an_unknown_conversation_is_404(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/conversations/never-started-1234", headers=BEARER)
    assert r.status_code == 404 and r.json()["error"] == "unknown_conversation"


async def test_openapi_describes_every_message_type(http: httpx.AsyncClient) -> None:
    r = await http.get("/openapi.json", headers=BEARER)
    assert r.status_code == 200
    doc = r.json()
    body = doc["paths"]["/v1/events/test.ping"]["post"]["requestBody"]["content"]["application/json"]
    prefix, _, name = body["schema"]["$ref"].rpartition("/")  # msgspec renames namesakes
    assert prefix == "#/components/schemas" and name.endswith("Ping")
    assert doc["components"]["schemas"][name]["required"] == ["text"]


def test_the_gateway_refuses_to_run_without_any_caller_credentials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="authenticate"):
        GatewayAuth.load(environ={})
    short = tmp_path / "tokens"
    short.write_text("ci=short\n")
    with pytest.raises(ConfigError, match="shorter"):
        GatewayAuth.load(short, environ={})


@pytest.mark.slow
async def test_mesh_gateway_serves_over_uvicorn_and_streams_a_conversation_as_sse(
    settings: Settings, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci={TOKEN}\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_NATS_URL": settings.nats_url or "", "MESH_DATA_DIR": str(settings.data_dir)})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p)
    metrics_port = free_port()
    env.update({"MESH_METRICS_PORT": str(metrics_port), "MESH_METRICS_HOST": "127.0.0.1"})
    argv = [sys.executable, "-m", "mesh", "gateway", "--port", str(port), "--tokens", str(tokens)]
    with (tmp_path / "gateway.log").open("wb") as log:
        argv += ["--types", "sample_agents.echo"]
        procs.append(await asyncio.to_thread(subprocess.Popen, argv, env=env, stdout=log, stderr=log))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, headers=BEARER, timeout=10) as web:
        for _ in range(300):  # up within 30 s
            assert procs[0].poll() is None, (tmp_path / "gateway.log").read_text()
            try:
                if (await web.get("/openapi.json")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        # the conversation an Idempotency-Key starts is known before it starts: follow it first
        _, conversation = idempotent_ids("token:ci", "streamed-1")
        seen: list[tuple[str, dict[str, Any]]] = []
        event = ""
        async with (
            running_agent(echo, settings),
            web.stream("GET", f"/v1/conversations/{conversation}/events") as sse,
        ):
            assert sse.headers["content-type"].startswith("text/event-stream")
            async for line in sse.aiter_lines():
                if line == ": following":  # subscribed: now start the work
                    key = {"Idempotency-Key": "streamed-1"}
                    r = await web.post(
                        "/v1/agents/echo?type=test.ping", json={"text": "streamed"}, headers=key
                    )
                    assert r.status_code == 202 and r.json()["conversation"] == conversation
                elif line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: "):
                    seen.append((event, json.loads(line[6:])))
                    if event == "test.pong":
                        break
    assert [e for e, _ in seen] == ["test.ping", "test.pong"]
    assert seen[1][1]["body"]["text"] == "streamed"
    # the gateway's own scrape endpoint counts its requests by route template and status
    duration = "http_server_request_duration_seconds_count"
    got = await scrape_until(
        metrics_port, lambda g: value(g, duration, http_route="/v1/conversations/{id}/events") >= 1
    )
    assert value(got, duration, http_route="/v1/agents/{agent}", http_response_status_code="202") == 1
    assert value(got, duration, http_route="/openapi.json", http_response_status_code="200") >= 1
    assert value(got, "http_server_active_requests") == 0


async def test_requests_are_counted_by_route_template_never_by_what_the_caller_wrote(
    settings: Settings, tmp_path: Path
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest

    from mesh.gateway.meters import RequestMeters
    from mesh.observability.metrics import prometheus_reader

    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[prometheus_reader(registry)])
    tokens = tmp_path / "tokens"
    tokens.write_text(f"ci={TOKEN}\n")
    gw = Gateway(with_role(settings, "publisher"), GatewayAuth.load(tokens, environ={}))
    await gw.start()
    try:
        metered = httpx.ASGITransport(app=RequestMeters(gw.app, provider))
        async with httpx.AsyncClient(transport=metered, base_url="http://gw", timeout=30) as c:
            assert (await c.get("/v1/conversations/" + "a" * 22)).status_code == 401  # no token
            assert (await c.get("/v1/conversations/" + "b" * 22, headers=BEARER)).status_code == 404
            assert (await c.get("/<script>/" + "x" * 500, headers=BEARER)).status_code == 404
            assert (await c.request("BREW", "/openapi.json", headers=BEARER)).status_code == 405
    finally:
        await gw.close()
    got = samples(generate_latest(registry).decode())
    count = "http_server_request_duration_seconds_count"
    route = "/v1/conversations/{id}"
    assert value(got, count, http_route=route, http_response_status_code="401") == 1
    assert value(got, count, http_route=route, http_response_status_code="404") == 1
    assert value(got, count, http_route="unmatched", http_response_status_code="404") == 1
    assert value(got, count, http_request_method="_OTHER") == 1
    labels = {v for (_, ls) in got for _, v in ls}
    assert not any("script" in v or "BREW" in v or "xxx" in v for v in labels)


async def test_a_streams_slot_is_taken_before_it_starts_and_given_back_however_it_ends() -> None:
    from starlette.requests import ClientDisconnect

    from mesh.gateway.wire import HeldStream, Slots

    slots = Slots(2)
    assert slots.take() and slots.take() and not slots.take()  # a burst cannot pass the limit

    async def lines() -> AsyncIterator[bytes]:
        yield b": following\n\n"
        await asyncio.sleep(3600)
        yield b"never"

    async def gone(message: Any) -> None:  # the client went away as the response started
        raise OSError("connection reset")

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "method": "GET"}
    with pytest.raises(ClientDisconnect):
        await HeldStream(lines(), slots)(scope, receive, gone)
    assert slots.taken == 1  # given back, though the stream never got past its first line
    assert slots.take() and not slots.take()
