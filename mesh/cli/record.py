"""Looking back at conversations, from the record (mesh.observability.history), as the
observer (what it may watch live): `mesh conversations`, `mesh show`; and using them as
regression tests (mesh.agent.replay), as the operator (who may read the journal of model
and tool results): `mesh record --export`, `mesh replay`."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from mesh.observability import history
from mesh.observability.conversation import causal_tree
from mesh.transport.auth import Role
from mesh.transport.nats import NatsTransport
from mesh.wire import subjects
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

Run = Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]


def register(cli: click.Group, settings_fn: Callable[[Role], Settings], run: Run) -> None:
    @cli.command("conversations")
    @click.option("--limit", "-n", type=click.IntRange(1, 10_000), default=20, show_default=True)
    @click.option(
        "--scan",
        type=click.IntRange(1, 10_000_000),
        default=20_000,
        show_default=True,
        help="Record entries read back from the newest.",
    )
    @click.option("--status", type=click.Choice(["done", "waiting", "failed", "running"]), help="Only these.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
    def conversations(limit: int, scan: int, status: str | None, as_json: bool) -> None:
        """List recent conversations, newest first: id, start, status, duration, agents,
        messages, model tokens and cost (from MESH_RECORD)."""
        settings = settings_fn("observer")

        async def go() -> None:
            transport = await NatsTransport.connect(settings, "mesh-history")
            try:
                found = await history.recent(transport, limit=limit, scan=scan)
            finally:
                await transport.close()
            rows = [s for s in found if status is None or s.status == status]
            if as_json:
                for s in rows:
                    click.echo(json.dumps(s.to_dict()))
                return
            if not rows:
                click.echo("no conversations recorded" + (f" with status {status}" if status else ""))
                return
            click.echo(
                f"{'CONVERSATION':<28} {'STARTED (UTC)':<19} {'STATUS':<8} {'DURATION':>9} "
                f"{'MSGS':>5} {'TOKENS':>9} {'COST $':>9}  AGENTS"
            )
            for s in rows:
                click.echo(
                    f"{s.id[:28]:<28} {_when(s.started):<19} {s.status:<8} {_took(s.duration):>9} "
                    f"{s.messages:>5} {s.input_tokens + s.output_tokens:>9} {s.cost_usd:>9.4f}  "
                    f"{','.join(s.agents)}"
                )

        run(go)

    @cli.command("show")
    @click.argument("conversation_id")
    @click.option("--bodies/--no-bodies", default=True, show_default=True, help="Print each message's body.")
    @click.option("--json", "as_json", is_flag=True, help="The summary and every message, as JSON.")
    def show(conversation_id: str, bodies: bool, as_json: bool) -> None:
        """Print one conversation from the record: who sent what to whom as a causal tree,
        what became of each delivery, the bodies, and its trace id."""
        settings = settings_fn("observer")
        conv = subjects.conversation_id(conversation_id)

        async def go() -> None:
            transport = await NatsTransport.connect(settings, "mesh-history")
            try:
                msgs = await history.conversation(transport, conv)
            finally:
                await transport.close()
            if not msgs:
                raise ConfigError(
                    f"no record of conversation {conv!r}: it is older than MESH_RECORD_RETENTION, "
                    f"was never recorded (MESH_RECORD=false), or the id is wrong (see `mesh conversations`)"
                )
            summary = history.summarize(conv, msgs)
            if as_json:
                click.echo(json.dumps({**summary.to_dict(), "messages": [_message_json(m) for m in msgs]}))
                return
            click.echo(render(summary, msgs, bodies=bodies))

        run(go)

    @cli.command("record")
    @click.argument("conversation_ids", nargs=-1, required=True, metavar="CONVERSATION...")
    @click.option(
        "--export",
        "directory",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Write each conversation to DIRECTORY/<id>.json (created if missing), to check in.",
    )
    def record_cmd(conversation_ids: tuple[str, ...], directory: Path) -> None:
        """Export recorded conversations to files that `mesh replay` and
        `mesh.testing.replay_file` take: the record entries and the journaled model and
        tool results."""
        from mesh.agent.replay import Recording

        settings = settings_fn("operator")  # the journal is read by the operator only
        convs = [subjects.conversation_id(c) for c in conversation_ids]

        async def go() -> list[Recording]:
            transport = await NatsTransport.connect(settings, "mesh-history")
            try:
                return [await Recording.from_mesh(transport, c, settings) for c in convs]
            finally:
                await transport.close()

        recordings = run(go)
        directory.mkdir(parents=True, exist_ok=True)
        for r in recordings:
            path = directory / f"{r.conversation}.json"
            path.write_bytes(r.dumps())
            click.echo(f"{path}  ({len(r.entries)} entries, {len(r.journal)} journaled results)")

    @cli.command("replay")
    @click.argument("source", metavar="CONVERSATION|FILE")
    @click.option(
        "--agent",
        "agent_specs",
        multiple=True,
        required=True,
        metavar="NAME=SPEC",
        help="An agent to test, as its new version: e.g. writer=./writer_v2.py:agent (repeatable).",
    )
    @click.option(
        "--live-model", is_flag=True, help="Call the configured model instead of the journaled answers."
    )
    @click.option(
        "--ignore", multiple=True, metavar="FIELD", help="A body field not to compare (repeatable)."
    )
    @click.option(
        "--settle", type=float, default=30.0, show_default=True, help="Seconds to wait for each input."
    )
    @click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
    def replay_cmd(
        source: str,
        agent_specs: tuple[str, ...],
        live_model: bool,
        ignore: tuple[str, ...],
        settle: float,
        as_json: bool,
    ) -> None:
        """Run a recorded conversation (by id, from MESH_RECORD, or a file from `mesh record
        --export`) through new versions of agents on an isolated mesh, and print how what they
        sent differs from the recording. Exit status 0: the same; 1: differences."""
        from mesh.agent.loader import load_agent
        from mesh.agent.replay import Recording, replay

        agents = {}
        for spec in agent_specs:
            name, eq, target = spec.partition("=")
            if not eq or not subjects.is_agent_name(name) or not target:
                raise click.BadParameter(
                    f"{spec!r}: write NAME=SPEC, e.g. writer=./writer_v2.py:agent", param_hint="--agent"
                )
            agents[name] = load_agent(target)
        settings = settings_fn("operator")  # the journal is read by the operator only

        from_file = (
            Recording.load(Path(source)) if source.endswith(".json") or Path(source).is_file() else None
        )

        async def go() -> Any:
            if from_file is not None:
                recording = from_file
            else:
                transport = await NatsTransport.connect(settings, "mesh-history")
                try:
                    conv = subjects.conversation_id(source)
                    recording = await Recording.from_mesh(transport, conv, settings)
                finally:
                    await transport.close()
            return await replay(
                recording, agents, ignore=ignore, live_model=live_model, settle_timeout=settle, base=settings
            )

        report = run(go)
        click.echo(json.dumps(report.to_dict()) if as_json else report.render())
        sys.exit(0 if report.same else 1)


def render(summary: history.Summary, msgs: list[history.Recorded], *, bodies: bool = True) -> str:
    """A conversation as `mesh show` prints it."""
    out = [
        f"conversation {summary.id}  {summary.status}  started {_when(summary.started)} UTC, "
        f"took {_took(summary.duration)}",
        f"agents: {', '.join(summary.agents) or '-'}   messages: {summary.messages}   "
        f"tokens: {summary.input_tokens} in / {summary.output_tokens} out   cost: ${summary.cost_usd:.4f}",
        f"trace: {', '.join(summary.trace_ids) or '-'}",
        "",
    ]
    by_id = {m.id: m for m in msgs}
    lines = [m.line() for m in msgs]
    start = min((line.sent_ns for line in lines if line.sent_ns), default=0)
    for depth, line in causal_tree(lines):
        m = by_id[line.id]
        indent = "   " * depth
        offset = f"{(line.sent_ns - start) / 1e6:9.1f} ms" if line.sent_ns and start else " " * 12
        out.append(f"{offset}  {indent}└─ {line.sender} → {line.receiver}  [{line.type}]  id={m.id}")
        for d in m.deliveries:
            used = f", {d.input_tokens}+{d.output_tokens} tokens ${d.cost_usd:.4f}" if d.input_tokens else ""
            why = f": {d.reason}" if d.reason else ""
            took = f"delivery {d.attempt}, {d.millis:.1f} ms{used}"
            out.append(f"{'':12}  {indent}   ↳ {d.agent}: {d.outcome} ({took}){why}")
        if bodies:
            text = json.dumps(m.body(), indent=2, ensure_ascii=False, default=str)
            out.extend(f"{'':12}  {indent}     {row}" for row in text.splitlines())
    return "\n".join(out)


def _message_json(m: history.Recorded) -> dict[str, Any]:
    return {
        "id": m.id,
        "subject": m.subject,
        "type": m.type,
        "sender": m.sender,
        "causation": m.causation,
        "sent_ns": m.sent_ns,
        "trace_id": m.trace_id,
        "recorded_by": m.sent_by,
        "headers": m.headers,
        "body": m.body(),
        "deliveries": [
            {
                "agent": d.agent,
                "outcome": d.outcome,
                "delivery": d.attempt,
                "ms": d.millis,
                "reason": d.reason,
                "input_tokens": d.input_tokens,
                "output_tokens": d.output_tokens,
                "cost_usd": d.cost_usd,
            }
            for d in m.deliveries
        ],
    }


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S") if seconds else "-"


def _took(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"
