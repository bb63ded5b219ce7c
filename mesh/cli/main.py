"""The `mesh` command line: up, down, run, publish, tap, agents, schema, trace, demo."""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import click
import msgspec

from mesh.transport.auth import Role
from mesh.wire import subjects
from mesh.wire.errors import ConfigError, MeshError
from mesh.wire.settings import Settings

T = TypeVar("T")


class _Group(click.Group):
    """A group that suggests the closest command on a typo."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            path = _command_path(ctx)
            close = difflib.get_close_matches(name, self.list_commands(ctx), n=1)
            hint = f" Did you mean `{path} {close[0]}`?" if close else ""
            ctx.fail(f"no command {name!r}.{hint} Run `{path} --help` to see the commands.")
        return super().resolve_command(ctx, args)


def _command_path(ctx: click.Context) -> str:
    """`mesh agents`, whatever the program was called (`python -m mesh`, a test runner)."""
    names: list[str] = []
    while ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["mesh", *names])


def _settings(role: Role | None = "operator") -> Settings:
    """Read settings; CLI logs (e.g. connection warnings) go to stderr, never into output.

    On the machine that runs the mesh (`mesh up` under the same data dir), a command without
    MESH_NATS_CREDS acts with the identity of `role` from the data dir (docs/security.md).
    """
    from mesh.observability.logs import configure_logging
    from mesh.transport.identities import with_role

    settings = Settings.load()
    configure_logging(settings)
    return with_role(settings, role) if role is not None else settings


def _run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    try:
        return asyncio.run(coro_fn())
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except MeshError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mesh-runtime", prog_name="mesh")
def cli() -> None:
    """An event-driven multi-agent mesh on NATS.

    Settings come from MESH_* environment variables (see docs/operations.md).
    """


def _register_groups() -> None:
    from mesh.cli import audit, cancel, creds, declare, dlq, escalations, gateway, llm, record, server

    server.register(cli, _settings)
    creds.register(cli, lambda: _settings(role=None))
    dlq.register(cli, _settings, _run)
    audit.register(cli, _settings, _run)
    record.register(cli, _settings, _run)
    cancel.register(cli, _settings, _run)
    escalations.register(cli, _settings, _run)
    llm.register(cli, _settings, _run)
    declare.register(agents, _settings, _run)
    gateway.register(cli, _settings)


def main() -> None:
    try:
        cli(standalone_mode=True)
    except (ConfigError, MeshError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2 if isinstance(exc, ConfigError) else 1)


# -- agents ------------------------------------------------------------------------


@cli.command()
@click.argument("spec")
@click.option(
    "--insecure",
    is_flag=True,
    help="Run without an identity, on a NATS server that requires none (as MESH_INSECURE=true).",
)
def run(spec: str, insecure: bool) -> None:
    """Run an agent: SPEC is `package.module:agent` or `path/to/file.py:agent`.

    Start it again (in another shell) for another replica; replicas share the work.
    """
    from mesh.agent.loader import load_agent
    from mesh.agent.serving import serve
    from mesh.observability.logs import configure_logging
    from mesh.observability.metrics import configure_metrics
    from mesh.observability.tracing import configure_tracing
    from mesh.wire.envelope import new_id

    settings = _settings(role=None)  # the agent's own identity: mesh.agent.identity
    if insecure:
        settings = settings.model_copy(update={"insecure": True})
    if settings.insecure and settings.nats_creds is None:
        click.echo(
            "WARNING: --insecure: this agent has no identity. It signs nothing and believes every "
            "Mesh-Sender it is sent; anyone who reaches the server can act as any agent.",
            err=True,
        )
    agent = load_agent(spec)
    instance = new_id()
    configure_logging(settings, agent=agent.name)
    shutdown_tracing = configure_tracing(settings, agent.name, instance)
    shutdown_metrics = configure_metrics(settings, agent.name, instance, scrape=True)
    try:
        _run(lambda: serve(agent, settings, instance=instance))
    finally:
        # the drain is over: a late signal must not cut the span export short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        shutdown_tracing()
        shutdown_metrics()


@cli.group(cls=_Group, invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per agent process.")
@click.option("--wait", default=0.5, show_default=True, help="Seconds to gather answers.")
@click.pass_context
def agents(ctx: click.Context, as_json: bool, wait: float) -> None:
    """List running agents, their replicas, counters and queues; `mesh agents add` declares
    agents before their first start.

    PENDING: stored messages not yet handed to a replica; REDELIVERED: messages out for a
    second (or later) delivery and not yet acknowledged (retries, crashed handlers). Both
    count the agent's inbox and event queues. WAITING: tool calls parked for an approval
    (`mesh approvals` lists them).
    """
    if ctx.invoked_subcommand is not None:
        return
    from mesh.patterns.approval import waiting_counts
    from mesh.runtime.discovery import backlog, discover
    from mesh.transport.keys import known_directory
    from mesh.transport.nats import NatsTransport

    settings = _settings("observer")

    async def go() -> None:
        transport = await NatsTransport.connect(settings, "mesh-cli")
        try:
            found = await discover(transport, timeout=wait, directory=known_directory(settings))
            queues = {name: await backlog(transport, name) for name in {a.name for a in found}}
            waiting = await waiting_counts(transport)
        finally:
            await transport.close()
        if as_json:
            for a in found:
                click.echo(
                    json.dumps({**a.__dict__, "queue": queues[a.name], "waiting": waiting.get(a.name, 0)})
                )
            return
        if not found:
            click.echo("no agents are running (start one with `mesh run module:agent`)")
            return
        by_name: dict[str, list[Any]] = {}
        for a in found:
            by_name.setdefault(a.name, []).append(a)
        click.echo(
            f"{'AGENT':<16}{'REPLICAS':>9}{'HANDLED':>9}{'ERRORS':>8}{'DLQ':>6}{'IN-FLIGHT':>11}"
            f"{'PENDING':>9}{'REDELIVERED':>13}{'WAITING':>9}  HANDLES"
        )
        for name, group in by_name.items():
            total = {
                k: sum(int(a.stats.get(k, 0)) for a in group)
                for k in ("handled", "errors", "dead_lettered", "in_flight")
            }
            q = queues[name]
            click.echo(
                f"{name:<16}{len(group):>9}{total['handled']:>9}{total['errors']:>8}"
                f"{total['dead_lettered']:>6}{total['in_flight']:>11}{q['pending']:>9}{q['redelivered']:>13}"
                f"{waiting.get(name, 0):>9}  {', '.join(group[0].handles)}"
            )

    _run(go)


_register_groups()


# -- messages ----------------------------------------------------------------------


@cli.command()
@click.argument("target")
@click.argument("body")
@click.option("--type", "type_name", help="Message type, when TARGET is an agent or a full subject.")
@click.option("--conversation", help="Conversation id (default: a new one).")
@click.option("--msgpack", is_flag=True, help="Send the body as msgpack instead of JSON.")
@click.option(
    "--wait-for", "wait_for", help="Wait for a message of this type in the conversation and print it."
)
@click.option("--timeout", default=30.0, show_default=True, help="Seconds for --wait-for.")
@click.option("--types", "types_", default="", help="Modules/.py files declaring your message types.")
@click.option("--deadline", type=float, help="Seconds the work may take; later steps are dropped to the DLQ.")
def publish(
    target: str,
    body: str,
    type_name: str | None,
    conversation: str | None,
    msgpack: bool,
    wait_for: str | None,
    timeout: float,
    types_: str,
    deadline: float | None,
) -> None:
    """Publish a message, as an external system would.

    TARGET is a message type (published as an event: every agent handling the type gets it),
    `agent:NAME` (sent to that agent's inbox; give --type), or a full mesh subject.
    BODY is the message as JSON; it is validated against the type before sending.
    """
    from mesh.agent.loader import import_types
    from mesh.wire.targets import parse_target, validate_body

    settings = _settings("publisher")
    import_types(",".join(filter(None, [settings.types, types_])))
    address, mtype = parse_target(target, type_name, conversation)
    message = validate_body(body, mtype)
    _run(lambda: _publish(settings, address, message, msgpack, wait_for, timeout, deadline))


async def _publish(
    settings: Settings,
    address: Any,
    message: Any,
    msgpack: bool,
    wait_for: str | None,
    timeout: float,
    deadline: float | None,
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from mesh.cli.reach import reach, warning
    from mesh.observability.tap import TapLine, format_line, tap
    from mesh.observability.tracing import configure_tracing, current_trace_id
    from mesh.runtime.client import ROOT, Lineage, MeshClient
    from mesh.wire.codec import JSON, MSGPACK
    from mesh.wire.subjects import conversation_pattern

    shutdown_tracing = configure_tracing(settings, "mesh-cli")
    client = await MeshClient.connect(settings, "cli")
    got: asyncio.Future[TapLine] = asyncio.get_running_loop().create_future()
    try:
        if wait_for:

            def on_line(line: TapLine) -> None:
                if line.type == wait_for and not got.done():
                    got.set_result(line)

            await tap(client.transport, conversation_pattern(address.conversation), on_line, full=True)
        lineage = ROOT
        if deadline is not None:
            lineage = Lineage(deadline_ms=int((time.time() + deadline) * 1000))
        tracer = trace.get_tracer("mesh")
        with tracer.start_as_current_span(
            f"cli publish {message.__mesh_type__.name}", kind=SpanKind.PRODUCER
        ):
            sent = await client.emit(address, message, lineage, content_type=MSGPACK if msgpack else JSON)
            trace_id = current_trace_id()
        await client.transport.flush()
        click.echo(
            f"published {message.__mesh_type__} id={sent.id} conversation={sent.conversation} "
            f"subject={sent.subject} trace={trace_id}"
        )
        said = warning(address, await reach(client.transport, address))
        if said:
            click.echo(f"warning: {said}", err=True)
        if wait_for:
            try:
                line = await asyncio.wait_for(got, timeout)
            except TimeoutError:
                raise MeshError(
                    f"no {wait_for} arrived in conversation {sent.conversation} within {timeout:.0f}s"
                ) from None
            click.echo(format_line(line))
            click.echo(json.dumps(line.body, indent=2))
    finally:
        await client.close()
        shutdown_tracing()


@cli.command("tap")
@click.argument("pattern", default=subjects.ALL)
@click.option("--conversation", "-c", help="Only this conversation (overrides PATTERN).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.option("--count", "-n", type=int, default=0, help="Stop after this many messages.")
@click.option("--timeout", type=float, default=0.0, help="Stop after this many seconds.")
@click.option("--full", is_flag=True, help="Show whole bodies, not a preview.")
@click.option(
    "--from-start", is_flag=True, help="With -c: the conversation's recorded messages first, then live."
)
def tap_cmd(
    pattern: str,
    conversation: str | None,
    as_json: bool,
    count: int,
    timeout: float,
    full: bool,
    from_start: bool,
) -> None:
    """Show messages live, decoded. Taps never take messages from agents.

    PATTERN is a NATS subject pattern (default `mesh.>`); e.g. `mesh.*.agent.triage`.
    """
    from mesh.observability.history import follow
    from mesh.observability.tap import TapLine, format_line, tap
    from mesh.transport.nats import NatsTransport
    from mesh.wire.subjects import check_pattern, conversation_pattern

    settings = _settings("observer")
    subject = conversation_pattern(conversation) if conversation else check_pattern(pattern)
    if from_start and not conversation:
        raise ConfigError("--from-start replays one conversation: give it with -c <conversation-id>")

    async def go() -> None:
        transport = await NatsTransport.connect(settings, "mesh-tap")
        done = asyncio.Event()
        seen = 0

        def on_line(line: TapLine) -> None:
            nonlocal seen
            seen += 1
            try:
                if as_json:
                    click.echo(json.dumps(line.to_dict()))
                else:
                    click.echo(format_line(line))
                    if full:
                        click.echo(json.dumps(line.body, indent=2))
            except BrokenPipeError:  # e.g. `mesh tap | head -1`: the reader is gone
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
                done.set()
                return
            if count and seen >= count:
                done.set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        if from_start and conversation:
            await follow(transport, conversation, on_line, full=full)
        else:
            await tap(transport, subject, on_line, full=full)
        await transport.flush()
        click.echo(f"tapping {subject} on {transport.connected_url} (Ctrl-C to stop)", err=True)
        try:
            await asyncio.wait_for(done.wait(), timeout or None)
        except TimeoutError:
            pass
        finally:
            await transport.close()

    _run(go)


@cli.command()
@click.argument("type_name", required=False, metavar="[TYPE[@VERSION]]")
@click.option("--types", "types_", default="", help="Modules/.py files declaring your message types.")
def schema(type_name: str | None, types_: str) -> None:
    """Print the JSON Schema of every message type (or of one)."""
    from mesh.agent.loader import import_types
    from mesh.wire.messages import registry
    from mesh.wire.targets import lookup

    import_types(",".join(filter(None, [_settings().types, types_])))
    if type_name:
        name, _, version = type_name.partition("@")
        types = [lookup(name, int(version) if version.isdigit() else None)]
    else:
        types = list(registry)
    refs, components = msgspec.json.schema_components([t.cls for t in types], ref_template="#/$defs/{name}")
    out = {}
    for t, ref in zip(types, refs, strict=True):
        component = ref["$ref"].rsplit("/", 1)[1]  # msgspec renames classes that share a name
        out[str(t)] = {**components[component], "x-mesh-type": t.name, "x-mesh-version": t.version}
    click.echo(json.dumps({"types": out, "$defs": components}, indent=2))


@cli.command("trace")
@click.argument("trace_id", metavar="TRACE_ID|CONVERSATION_ID")
def trace_cmd(trace_id: str) -> None:
    """Print the spans of one trace from the local span file; given a conversation id, of
    every trace that conversation's messages are in."""
    from mesh.observability.tracing import conversation_traces, read_spans, render_spans

    settings = _settings()
    spans = read_spans(settings.spans_path, trace_id)
    if spans:
        click.echo(render_spans(spans))
        return
    every = read_spans(settings.spans_path)
    traces = conversation_traces(every, trace_id)
    if not traces:
        raise ConfigError(f"no spans of trace or conversation {trace_id} in {settings.spans_path}")
    for n, tid in enumerate(traces):
        click.echo(f"{'' if n == 0 else chr(10)}trace {tid} (conversation {trace_id})")
        click.echo(render_spans([s for s in every if s.get("trace_id") == tid]))


@cli.command()
@click.option("--tickets", default=2, show_default=True, help="How many tickets to run through.")
@click.option("--interactive", is_flag=True, help="Ask before approving a tool call (e.g. a refund).")
def demo(tickets: int, interactive: bool) -> None:
    """Run the support-desk demo: six agent processes on an embedded server."""
    from mesh.cli.demo import run_demo

    async def ask(question: str) -> bool:
        answer = await asyncio.to_thread(click.prompt, f"\n  {question}. Approve?", default="y")
        return str(answer).strip().lower() in ("y", "yes")

    # no role here: the settings go to the agents the demo starts, and each agent provisions
    # its own identity (the demo's helpdesk takes the operator role itself)
    settings = _settings(None)
    _run(lambda: run_demo(settings, tickets=tickets, ask=ask if interactive else None))


@cli.command()
@click.option("--quick", is_flag=True, help="Smaller counts and one round: under a minute.")
@click.option("--only", default="", help="Comma-separated workloads (pipeline, hop, fanout, join, memory).")
@click.option("--rounds", type=int, default=0, help="Rounds per phase (default: 1 quick, 3 full).")
def bench(quick: bool, only: str, rounds: int) -> None:
    """Measure the mesh at its defaults beside raw core NATS, raw JetStream and FastStream
    (needs a clone of the repository: benchmarks/; `make bench` installs FastStream)."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run.py").exists():
        raise ConfigError(
            f"mesh bench runs the benchmarks/ package of a clone of the repository, and there is none "
            f"beside this installation ({root}); clone it and run `make bench` there"
        )
    sys.path.insert(0, str(root))
    from benchmarks.run import run_bench

    names = [n.strip() for n in only.split(",") if n.strip()] or None
    run_bench("quick" if quick else "full", only=names, rounds=rounds or None, echo=click.echo)
