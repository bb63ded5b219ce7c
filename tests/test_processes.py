"""Agents as separate OS processes started with `mesh run`, as users start them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLES
from sample_agents.echo import Ping, Pong

from mesh.cli.main import cli
from mesh.observability.tracing import read_spans
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import discover, wait_for_agents
from mesh.testing import Recorder, spawn_agent, stop_process
from mesh.wire import envelope as h
from mesh.wire.codec import default_codec
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address

pytestmark = pytest.mark.slow

ECHO = f"{SAMPLES / 'echo.py'}:agent"


def _env(settings: Settings) -> dict[str, str]:
    return {
        "MESH_NATS_URL": settings.nats_url or "",
        "MESH_DATA_DIR": str(settings.data_dir),
        "PATH": str(Path(sys.executable).parent),
    }


async def test_two_replicas_share_the_work(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    for i in range(2):
        procs.append(spawn_agent(ECHO, settings, log=tmp_path / f"echo{i}.log"))
    await wait_for_agents(client.transport, {"echo": 2})
    rec = await Recorder.start(client.transport, "mesh.replicas.evt.test.pong")
    for n in range(40):
        await client.send("echo", Ping(text="share", n=n), conversation="replicas")
    pongs = [default_codec.decode(m.data, Pong) for m in await rec.wait_count(40)]
    assert sorted(p.n for p in pongs) == list(range(40))  # each handled exactly once
    by_pid = {p.pid for p in pongs}
    assert by_pid == {proc.pid for proc in procs}, f"work went to {by_pid}"
    # graceful drain on SIGTERM: exit code 0
    assert [stop_process(p) for p in procs] == [0, 0]


async def test_sigterm_finishes_in_flight_work_before_exit(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    proc = spawn_agent(ECHO, settings, log=tmp_path / "echo.log")
    procs.append(proc)
    await wait_for_agents(client.transport, {"echo": 1})
    rec = await Recorder.start(client.transport, "mesh.drain.evt.test.pong")
    await client.send("echo", Ping(text="slow", n=1), conversation="drain")
    await rec.wait_count(1)  # the handler has started
    proc.terminate()
    msgs = await rec.wait_count(2)
    assert [default_codec.decode(m.data, Pong).text for m in msgs] == ["started", "slow"]
    assert await asyncio.to_thread(proc.wait, 15) == 0


async def test_a_new_agent_file_joins_with_mesh_run(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    agent_file = tmp_path / "greeter.py"
    agent_file.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(SAMPLES.parent)!r})
            from sample_agents.echo import Ping, Pong
            from mesh import Agent, Context

            agent = Agent("greeter", description="says hello")

            @agent.handler
            async def greet(ping: Ping, ctx: Context) -> Pong:
                return Pong(text="hello " + ping.text, n=ping.n, pid=0, instance=ctx.instance)
            """
        )
    )
    procs.append(spawn_agent(f"{agent_file}:agent", settings, log=tmp_path / "greeter.log"))
    await wait_for_agents(client.transport, {"greeter": 1})
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mesh", "agents", "--json"],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    names = [json.loads(line)["name"] for line in listed.stdout.splitlines()]
    assert "greeter" in names
    rec = await Recorder.start(client.transport, "mesh.greet.evt.test.pong")
    await client.send("greeter", Ping(text="world"), conversation="greet")
    [msg] = await rec.wait_count(1)
    assert default_codec.decode(msg.data, Pong).text == "hello world"


async def test_one_trace_across_three_processes(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    from sample_agents.relay import Baton

    spans_file = tmp_path / "spans.jsonl"
    env = {"MESH_TRACE_EXPORTER": "file", "MESH_TRACE_FILE": str(spans_file)}
    for name in ("first", "second", "third"):
        procs.append(
            spawn_agent(f"{SAMPLES / 'relay.py'}:{name}", settings, log=tmp_path / f"{name}.log", env=env)
        )
    await wait_for_agents(client.transport, {"first": 1, "second": 1, "third": 1})
    rec = await Recorder.start(client.transport, "mesh.traced.>")
    await client.publish(Baton(token="tr"), conversation="traced")
    msgs = await rec.wait_for(lambda ms: any(m.headers.get(h.TYPE) == "test.finished" for m in ms))
    for p in procs:
        assert stop_process(p) == 0  # SIGTERM flushes the spans
    traceparents = {m.headers[h.TRACEPARENT].split("-")[1] for m in msgs if h.TRACEPARENT in m.headers}
    assert len(traceparents) == 1, traceparents
    [trace_id] = traceparents
    spans = {s["service"]: s for s in read_spans(spans_file, trace_id)}
    assert set(spans) == {"first", "second", "third"}
    assert spans["first"]["parent_span_id"] is None  # the test process published without a trace
    assert spans["second"]["parent_span_id"] == spans["first"]["span_id"]
    assert spans["third"]["parent_span_id"] == spans["second"]["span_id"]
    assert all(s["attributes"]["messaging.message.conversation_id"] == "traced" for s in spans.values())
    # `mesh trace` takes the conversation id as well as the trace id
    by_conversation = CliRunner().invoke(cli, ["trace", "traced"], env={"MESH_TRACE_FILE": str(spans_file)})
    assert by_conversation.exit_code == 0, by_conversation.output
    assert by_conversation.output.startswith(f"trace {trace_id} (conversation traced)\n")
    assert all(f"[{name}]" in by_conversation.output for name in ("first", "second", "third"))
    unknown = CliRunner().invoke(cli, ["trace", "nothing-here"], env={"MESH_TRACE_FILE": str(spans_file)})
    assert isinstance(unknown.exception, ConfigError) and "trace or conversation" in str(unknown.exception)


async def test_a_process_that_records_no_spans_keeps_the_trace_whole(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    from sample_agents.relay import Baton

    spans_file = tmp_path / "spans.jsonl"
    for name in ("first", "second", "third"):
        exporter = "none" if name == "second" else "file"
        env = {"MESH_TRACE_EXPORTER": exporter, "MESH_TRACE_FILE": str(spans_file)}
        procs.append(
            spawn_agent(f"{SAMPLES / 'relay.py'}:{name}", settings, log=tmp_path / f"{name}.log", env=env)
        )
    await wait_for_agents(client.transport, {"first": 1, "second": 1, "third": 1})
    rec = await Recorder.start(client.transport, "mesh.halftraced.>")
    await client.publish(Baton(token="tr"), conversation="halftraced")
    await rec.wait_for(lambda ms: any(m.headers.get(h.TYPE) == "test.finished" for m in ms))
    for p in procs:
        assert stop_process(p) == 0
    spans = {s["service"]: s for s in read_spans(spans_file)}
    assert set(spans) == {"first", "third"}
    assert spans["third"]["trace_id"] == spans["first"]["trace_id"]
    assert spans["third"]["parent_span_id"] == spans["first"]["span_id"]


async def test_cli_publish_reaches_agent_and_tap_sees_it(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    procs.append(spawn_agent(ECHO, settings, log=tmp_path / "echo.log"))
    await wait_for_agents(client.transport, {"echo": 1})
    env = _env(settings)
    tap = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh",
        "tap",
        "--json",
        "--count",
        "2",
        "--timeout",
        "30",
        "-c",
        "clitap",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tap.stderr is not None
    ready = await asyncio.wait_for(tap.stderr.readline(), 30)  # "tapping ..." once subscribed
    assert b"tapping mesh.clitap.>" in ready
    pub = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "mesh",
            "publish",
            "--types",
            str(SAMPLES / "echo.py"),
            "--conversation",
            "clitap",
            "test.ping",
            '{"text": "from the shell", "n": 5}',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert pub.returncode == 0, pub.stderr
    assert "published test.ping@1" in pub.stdout
    out, _ = await asyncio.wait_for(tap.communicate(), 30)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert [(ln["sender"], ln["receiver"], ln["type"]) for ln in lines] == [
        ("cli", "evt:test.ping", "test.ping"),
        ("echo", "evt:test.pong", "test.pong"),
    ]
    assert lines[1]["causation"] == lines[0]["id"]
    assert '"from the shell"' in lines[1]["preview"]
    assert all(ln["conversation"] == "clitap" and ln["latency_ms"] is not None for ln in lines)


async def test_tap_does_not_take_messages_from_agents(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    procs.append(spawn_agent(ECHO, settings, log=tmp_path / "echo.log"))
    await wait_for_agents(client.transport, {"echo": 1})
    taps = [await Recorder.start(client.transport, "mesh.notsteal.agent.echo") for _ in range(2)]
    pongs = await Recorder.start(client.transport, "mesh.notsteal.evt.test.pong")
    for n in range(20):
        await client.send("echo", Ping(text="x", n=n), conversation="notsteal")
    assert len(await pongs.wait_count(20)) == 20
    for t in taps:
        assert len(await t.wait_count(20)) == 20


async def test_discovery_reports_handles_and_counters(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    procs.append(spawn_agent(ECHO, settings, log=tmp_path / "echo.log"))
    await wait_for_agents(client.transport, {"echo": 1})
    pongs = await Recorder.start(client.transport, "mesh.disc.evt.test.pong")
    for n in range(3):
        await client.send("echo", Ping(text="x", n=n), conversation="disc")
    await pongs.wait_count(3)
    async with asyncio.timeout(10):  # a handler's answer goes out just before it is counted
        while True:
            [echo] = [a for a in await discover(client.transport) if a.name == "echo"]
            if echo.stats["handled"] == 3:
                break
    assert echo.handles == ["test.ping@1"]
    assert {e["subject"] for e in echo.endpoints} == {
        "mesh.*.agent.echo",
        "mesh.*.direct.echo",
        "mesh.*.evt.test.ping",
    }
    assert echo.stats["handled"] == 3
    assert Address.inbox("x", "echo").subject == "mesh.x.agent.echo"


async def test_discovery_answers_parse_as_nats_micro_responses(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """nats-py's own micro types read our $SRV answers, as `nats micro` tools do."""
    from nats.micro.service import ServiceInfo, ServicePing, ServiceStats

    procs.append(spawn_agent(ECHO, settings, log=tmp_path / "echo.log"))
    await wait_for_agents(client.transport, {"echo": 1})
    nc = client.transport.nc  # type: ignore[attr-defined]
    ping = ServicePing.from_dict(json.loads((await nc.request("$SRV.PING.echo", b"", timeout=5)).data))
    info = ServiceInfo.from_dict(json.loads((await nc.request("$SRV.INFO.echo", b"", timeout=5)).data))
    stats = ServiceStats.from_dict(json.loads((await nc.request("$SRV.STATS.echo", b"", timeout=5)).data))
    assert ping.name == info.name == stats.name == "echo"
    assert info.metadata["mesh.handles"] == "test.ping@1"
    assert {e.queue_group for e in info.endpoints} == {"echo"}
    assert stats.endpoints[0].num_requests == 0


async def test_spans_go_to_otlp_when_an_endpoint_is_set(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """An agent process exports its spans over OTLP/HTTP to a collector on loopback."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    received: list[ExportTraceServiceRequest] = []
    arrived = threading.Event()

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/v1/traces":
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                received.append(req)
                arrived.set()
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{httpd.server_address[1]}"}
        proc = spawn_agent(ECHO, settings, log=tmp_path / "echo.log", env=env)
        procs.append(proc)
        await wait_for_agents(client.transport, {"echo": 1})
        pongs = await Recorder.start(client.transport, "mesh.otlp.evt.test.pong")
        await client.send("echo", Ping(text="o"), conversation="otlp")
        [pong] = await pongs.wait_count(1)
        assert stop_process(proc) == 0  # shutdown flushes the batch
        assert await asyncio.to_thread(arrived.wait, 10)
    finally:
        httpd.shutdown()
        httpd.server_close()
    spans = [
        (span, rs.resource)
        for req in received
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    [(span, resource)] = [(s, r) for s, r in spans if s.name == "echo process test.ping"]
    assert span.trace_id.hex() == pong.headers[h.TRACEPARENT].split("-")[1]
    service = {a.key: a.value.string_value for a in resource.attributes}["service.name"]
    assert service == "echo"
