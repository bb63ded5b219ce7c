"""`mesh audit`: read and verify the audit trail (mesh.runtime.audit), as the operator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import click
import msgspec

from mesh.runtime import audit
from mesh.transport.nats import NatsTransport
from mesh.wire import subjects
from mesh.wire.errors import MeshError
from mesh.wire.settings import Settings


async def stored_records(
    transport: NatsTransport, writer: str = "*"
) -> AsyncIterator[tuple[str, int, bytes]]:
    """Every audit record in the stream, oldest first: (subject, stream sequence, data)."""
    pattern = subjects.audit_pattern(writer) if writer != "*" else f"{subjects.AUDIT_ROOT}.>"
    seq = 1
    while (raw := await transport.stored_next(audit.STREAM, seq, pattern)) is not None:
        yield str(raw.subject), int(raw.seq), bytes(raw.data)
        seq = int(raw.seq) + 1


def register(
    cli: click.Group,
    settings_fn: Callable[[], Settings],
    run: Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any],
) -> None:
    @cli.group("audit")
    def audit_group() -> None:
        """The audit trail: tool calls, approvals, memory, refusals, re-drives (operator only)."""

    @audit_group.command("ls")
    @click.option("--writer", default="*", help="Only the records of this agent (or client).")
    @click.option("--kind", default="", help="Only records of this kind (tool_call, approval, ...).")
    @click.option("--json", "as_json", is_flag=True, help="One JSON record a line.")
    def ls(writer: str, kind: str, as_json: bool) -> None:
        """List audit records, oldest first."""
        settings = settings_fn()

        async def go() -> None:
            transport = await NatsTransport.connect(settings, "mesh-audit")
            try:
                async for subject, seq, data in stored_records(transport, writer):
                    try:
                        rec = audit.decoded(data)
                    except msgspec.DecodeError:
                        click.echo(f"{seq}  {subject}  (not an audit record)")
                        continue
                    if kind and rec.kind != kind:
                        continue
                    if as_json:
                        click.echo(json.dumps({"stream_seq": seq, **msgspec.to_builtins(rec)}))
                        continue
                    when = datetime.fromtimestamp(rec.at, UTC).strftime("%Y-%m-%d %H:%M:%S")
                    detail = " ".join(f"{k}={v}" for k, v in rec.detail.items())
                    click.echo(f"{seq}  {when}  {rec.writer}#{rec.seq}  {rec.kind}  by {rec.actor}  {detail}")
            finally:
                await transport.close()

        run(go)

    @audit_group.command("verify")
    def verify() -> None:
        """Check every writer's chain; exit 1 and say where if one is broken."""
        settings = settings_fn()

        async def go() -> None:
            transport = await NatsTransport.connect(settings, "mesh-audit")
            try:
                stored = [r async for r in stored_records(transport)]
            finally:
                await transport.close()
            count, breaks = audit.verify(stored)
            chains = len({subject for subject, _, _ in stored})
            if breaks:
                for b in breaks:
                    click.echo(f"broken: {b.subject} at stream sequence {b.stream_seq}: {b.reason}", err=True)
                raise MeshError(f"{len(breaks)} break(s) in {count} audit records")
            click.echo(f"{count} audit records in {chains} chains: every chain holds")

        run(go)
