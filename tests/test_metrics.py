"""Metrics (docs/operations.md#metrics): a `mesh run` process serves them on
MESH_METRICS_PORT and they move as it handles messages; tools and model calls are counted;
the Grafana dashboard queries only metrics the mesh exports."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES
from opentelemetry.metrics import Counter, Histogram, UpDownCounter
from opentelemetry.sdk.metrics import MeterProvider
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from sample_agents.echo import Ping, Pong

from mesh import Agent
from mesh.gateway.meters import RequestMeters
from mesh.llm import toolmeters
from mesh.llm.metering import Metering, Scope, _scope
from mesh.llm.tools import Tool, ToolError
from mesh.llm.types import Usage
from mesh.observability.metrics import metrics_exporter_kind, prometheus_reader
from mesh.runtime.backlog import Backlog
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.runtime.metered import MessageMeters
from mesh.services.memory import MemoryMeters
from mesh.testing import Recorder, spawn_agent, stop_process
from mesh.wire.codec import default_codec
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "mesh.json"

AGENT_FILE = f"""
import sys
sys.path.insert(0, {str(SAMPLES.parent)!r})
from sample_agents.echo import Ping, Pong
from mesh import Agent, Context

agent = Agent("gauged", description="answers pings; fails on 'fail'")

@agent.handler
async def on_ping(ping: Ping, ctx: Context) -> Pong:
    if ping.text == "fail":
        raise RuntimeError("asked to fail")
    return Pong(text=ping.text, n=ping.n, pid=0, instance=ctx.instance)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, by name and labels (the OTel scope labels left out)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope"))
            out[(s.name, labels)] = s.value
    return out


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in scraped.items() if n == name and want <= ls)


async def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    return samples(await asyncio.to_thread(get))


async def scrape_until(port: int, done: Any, timeout: float = 20.0) -> dict[Any, float]:
    """Scrape until `done(samples)`: a message is counted once settled, just after its answer."""
    async with asyncio.timeout(timeout):
        while True:
            got = await scrape(port)
            if done(got):
                return got
            await asyncio.sleep(0.05)


@pytest.mark.slow
async def test_the_scrape_endpoint_shows_the_counters_moving(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    agent_file = tmp_path / "gauged.py"
    agent_file.write_text(textwrap.dedent(AGENT_FILE))
    port = free_port()
    env = {
        "MESH_METRICS_PORT": str(port),
        "MESH_METRICS_HOST": "127.0.0.1",
        "MESH_MAX_DELIVER": "2",
        "MESH_RETRY_BACKOFF": "0.05",
    }
    procs.append(spawn_agent(f"{agent_file}:agent", settings, log=tmp_path / "gauged.log", env=env))
    await wait_for_agents(client.transport, {"gauged": 1})
    ping = {"mesh_agent": "gauged", "mesh_message_type": "test.ping"}
    before = await scrape_until(port, lambda s: value(s, "mesh_consumer_pending", mesh_agent="gauged") == 0)
    # its consumers' backlog, read from the server at start (then every 15 s): nothing waits
    inbox = {"mesh_agent": "gauged", "mesh_stream": "MESH_INBOX", "mesh_consumer": "gauged"}
    assert any(n == "mesh_consumer_pending" and set(inbox.items()) <= ls for n, ls in before)
    assert value(before, "mesh_consumer_ack_pending", **inbox) == 0
    handled0 = value(before, "mesh_messages_handled_total", **ping)
    latency0 = value(before, "mesh_handler_duration_seconds_count", **ping, outcome="handled")

    n = 7
    rec = await Recorder.start(client.transport, "mesh.gauge.evt.test.pong")
    for i in range(n):
        await client.send("gauged", Ping(text="count", n=i), conversation="gauge")
    assert len(await rec.wait_count(n)) == n
    assert all(default_codec.decode(m.data, Pong).text == "count" for m in rec.messages)
    after = await scrape_until(
        port, lambda s: value(s, "mesh_messages_handled_total", **ping) >= handled0 + n
    )
    assert value(after, "mesh_messages_handled_total", **ping) == handled0 + n
    assert value(after, "mesh_handler_duration_seconds_count", **ping, outcome="handled") == latency0 + n
    assert value(after, "mesh_messages_in_flight", mesh_agent="gauged") == 0
    assert value(after, "mesh_messages_failed_total", **ping) == 0

    # a handler that raises: failed on each of its 2 deliveries, then dead-lettered
    await client.send("gauged", Ping(text="fail"), conversation="gauge")
    dead = {**ping, "mesh_dead_letter_kind": "handler_error"}
    failed = await scrape_until(port, lambda s: value(s, "mesh_messages_dead_lettered_total", **dead) >= 1)
    assert value(failed, "mesh_messages_dead_lettered_total", **dead) == 1
    assert value(failed, "mesh_messages_failed_total", **ping) == 2
    assert value(failed, "mesh_messages_redelivered_total", **ping) == 1
    assert value(failed, "mesh_messages_handled_total", **ping) == handled0 + n
    assert stop_process(procs.pop()) == 0


def test_a_bad_metrics_port_is_a_settings_error() -> None:
    for bad in ("70000", "-1", "http"):
        with pytest.raises(ConfigError, match="MESH_METRICS_PORT"):
            Settings.load(environ={"MESH_METRICS_PORT": bad})
    assert Settings.load(environ={"MESH_METRICS_PORT": "9464"}).metrics_port == 9464
    assert Settings.load(environ={}).metrics_port == 0  # no endpoint


def test_a_taken_metrics_port_stops_the_agent_with_a_clear_error(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"MESH_METRICS_PORT": str(port), "MESH_METRICS_HOST": "127.0.0.1"}
        log = tmp_path / "echo.log"
        proc = spawn_agent(f"{SAMPLES / 'echo.py'}:agent", settings, log=log, env=env)
        assert proc.wait(timeout=60) == 2
    assert f"MESH_METRICS_PORT={port}: cannot serve metrics" in log.read_text()


def test_metrics_are_pushed_where_an_otlp_endpoint_is_set() -> None:
    s = Settings.load(environ={})
    assert metrics_exporter_kind(s, {}) == "none"
    assert metrics_exporter_kind(s, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4318"}) == "otlp"
    assert metrics_exporter_kind(s, {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://otel:4318"}) == "otlp"
    assert metrics_exporter_kind(
        s, {"OTEL_EXPORTER_OTLP_ENDPOINT": "x", "OTEL_METRICS_EXPORTER": "none"}
    ) == ("none")
    assert metrics_exporter_kind(s.model_copy(update={"trace_exporter": "console"}), {}) == "console"


def _registry() -> tuple[CollectorRegistry, MeterProvider]:
    registry = CollectorRegistry()
    return registry, MeterProvider(metric_readers=[prometheus_reader(registry)])


def _scraped(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client import generate_latest

    return samples(generate_latest(registry).decode())


async def test_tool_runs_and_model_tokens_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, provider = _registry()
    monkeypatch.setattr(toolmeters, "_meters", toolmeters.ToolMeters(provider))

    async def add(args: Any) -> int:
        return int(args["a"]) + int(args["b"])

    async def broken(args: Any) -> int:
        raise ValueError("no")

    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
    token = _scope.set(Scope(agent="calc"))
    try:
        ok, bad = Tool("add", "adds", schema, add), Tool("broken", "fails", {"type": "object"}, broken)
        assert await ok.run({"a": 1, "b": 2}) == "3"
        assert await ok.run({"a": 2, "b": 2}) == "4"
        with pytest.raises(ToolError):
            await bad.run({})
        metering = Metering(provider)
        metering.record(_NoSpan(), "anthropic", "claude-haiku-4-5", Usage(1000, 200), 0.5)
    finally:
        _scope.reset(token)
    got = _scraped(registry)
    assert value(got, "mesh_tool_calls_total", mesh_agent="calc", mesh_tool="add", outcome="ok") == 2
    assert value(got, "mesh_tool_duration_seconds_count", mesh_tool="add") == 2
    assert value(got, "mesh_tool_errors_total", mesh_tool="broken", error_type="failed") == 1
    assert value(got, "mesh_tool_calls_total", mesh_tool="broken", outcome="failed") == 1
    tokens = {"mesh_agent": "calc", "gen_ai_token_type": "input"}
    assert value(got, "gen_ai_client_token_usage_sum", **tokens) == 1000
    assert value(got, "mesh_llm_cost_USD_total", mesh_agent="calc") == pytest.approx(0.002)


class _NoSpan:
    def is_recording(self) -> bool:
        return False


def _exported_names() -> set[str]:
    """The name of every sample the mesh's instruments produce, each recorded once."""
    registry, provider = _registry()
    meters = [MessageMeters("a", provider), toolmeters.ToolMeters(provider), Metering(provider)]
    meters.append(MemoryMeters(provider))
    meters.append(RequestMeters(lambda *_: None, provider))  # type: ignore[arg-type]  # the gateway's
    backlog = Backlog(None, "a", [], provider)  # type: ignore[arg-type]  # observed, not read
    backlog.readings[("MESH_INBOX", "a")] = (1, 1)
    for m in meters:
        for instrument in vars(m).values():
            if isinstance(instrument, (Counter, UpDownCounter)):
                instrument.add(1, {})
            elif isinstance(instrument, Histogram):
                instrument.record(1, {})
    return {name for name, _ in _scraped(registry)}


def test_the_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [re.sub(r"by \([^)]*\)", "", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    queried = {n for e in exprs for n in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", e)}
    variables = [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    queried |= {n for d in variables for n in re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", d)}
    exported = _exported_names()
    assert queried, "no metric found in the dashboard's queries"
    assert queried <= exported, f"queried but not exported: {sorted(queried - exported)}"
    wanted = {
        "mesh_messages_handled_total",
        "mesh_messages_failed_total",
        "mesh_handler_duration_seconds_bucket",
        "mesh_messages_in_flight",
        "mesh_messages_dead_lettered_total",
        "mesh_tool_errors_total",
        "gen_ai_client_token_usage_sum",
        "mesh_llm_cost_USD_total",
        "http_server_request_duration_seconds_count",
        "mesh_consumer_pending",
    }
    assert wanted <= queried, f"the dashboard does not show {sorted(wanted - queried)}"


async def test_the_ladder_counts_each_outcome_once_settled() -> None:
    from test_ladder import SETTINGS, Letters, Told, _Log, returning, work

    from mesh.runtime.discovery import Stats
    from mesh.runtime.ladder import Duplicate, HandlerFailed, Settle
    from mesh.runtime.metered import Measure, Outcome
    from mesh.runtime.retries import Failures
    from mesh.transport.state import MemoryState
    from mesh.wire.errors import DeliveryError

    registry, provider = _registry()
    meters = MessageMeters("a", provider)
    escalating = {"yes": False}

    async def escalate(w: Any, reason: str) -> bool:
        return escalating["yes"]

    def ladder(below: Any) -> Measure:
        settle = Settle(
            Outcome(below, meters, SETTINGS.max_deliver),
            agent="a",
            settings=SETTINGS,
            stats=Stats(),
            processed=MemoryState(),
            failures=Failures(MemoryState(), "a", "i1"),
            dead_letter=Letters(),
            log=_Log(),
            escalate=escalate,
        )
        return Measure(settle, meters)

    await ladder(returning(None))(work(Told()))
    await ladder(returning(HandlerFailed("boom")))(work(Told(attempt=1)))  # retried
    await ladder(returning(HandlerFailed("boom")))(work(Told(attempt=3)))  # the last: dead-lettered
    await ladder(returning(DeliveryError("oversize", "too big")))(work(Told()))
    await ladder(returning(Duplicate()))(work(Told(attempt=2)))
    escalating["yes"] = True
    await ladder(returning(HandlerFailed("boom")))(work(Told(attempt=3)))  # handed on instead
    got = _scraped(registry)
    ping = {"mesh_agent": "a", "mesh_message_type": "t.ping"}
    assert value(got, "mesh_messages_handled_total", **ping) == 1
    assert value(got, "mesh_messages_failed_total", **ping) == 3
    assert value(got, "mesh_messages_dead_lettered_total", **ping, mesh_dead_letter_kind="handler_error") == 1
    assert value(got, "mesh_messages_dead_lettered_total", **ping, mesh_dead_letter_kind="oversize") == 1
    assert value(got, "mesh_messages_escalated_total", **ping) == 1
    assert value(got, "mesh_messages_redelivered_total", **ping) == 3
    assert value(got, "mesh_handler_duration_seconds_count", **ping) == 6
    for outcome, n in {
        "handled": 1,
        "retried": 1,
        "dead_lettered": 2,
        "duplicate": 1,
        "escalated": 1,
    }.items():
        assert value(got, "mesh_handler_duration_seconds_count", **ping, outcome=outcome) == n
    assert value(got, "mesh_messages_in_flight", mesh_agent="a") == 0


def test_the_metric_rungs_are_left_out_where_nothing_keeps_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry import metrics

    from mesh.runtime.metered import Measure, Outcome, measured, metered

    async def below(w: Any) -> None:
        return None

    # this process (the tests') installs no meter provider: every instrument is a no-op
    stored, direct, meters = metered(below, below, "a", 3)
    assert (stored, direct, meters) == (below, below, None)
    assert measured(below, meters) is below
    # with the SDK's provider (what configure_metrics installs) both rungs are there
    _, provider = _registry()
    monkeypatch.setattr(metrics, "get_meter_provider", lambda: provider)
    stored, direct, meters = metered(below, below, "a", 3)
    assert isinstance(stored, Outcome) and isinstance(direct, Outcome) and meters is not None
    assert isinstance(measured(below, meters), Measure)


async def test_the_backlog_gauges_read_the_consumers_pending_counts_from_the_server(
    settings: Settings, operator: MeshClient
) -> None:
    from mesh.transport import streams

    agent = Agent("backlogged", description="never started: its inbox only fills")

    @agent.handler
    async def on_ping(ping: Ping) -> None:
        return None

    specs = streams.agent_consumer_specs(agent, settings)
    for spec in specs:  # as `mesh agents add` makes them before any replica runs
        await operator.transport.ensure_consumer(spec)
    for i in range(3):
        await operator.send("backlogged", Ping(text="waiting", n=i), conversation="backlog")
    registry, provider = _registry()
    backlog = Backlog(operator.transport, "backlogged", specs, provider)
    assert not _scraped(registry)  # nothing is reported before the first reading
    await backlog.read()
    got = _scraped(registry)
    inbox = {"mesh_agent": "backlogged", "mesh_stream": "MESH_INBOX", "mesh_consumer": "backlogged"}
    assert value(got, "mesh_consumer_pending", **inbox) == 3
    assert value(got, "mesh_consumer_ack_pending", **inbox) == 0
    # the number KEDA's trigger reads is the same consumer info
    info = await operator.transport.consumer_info("MESH_INBOX", "backlogged")
    assert info.num_pending + info.num_ack_pending == 3
    # a consumer the server does not have keeps no reading, and reading it does not fail
    missing = streams.consumer_specs("never-declared", [], settings)
    gone = Backlog(operator.transport, "never-declared", missing, provider)
    await gone.read()
    assert gone.readings == {}
