"""`mesh escalations`: the work that failed its last retry and waits for a person
(mesh.patterns.escalation), and `retry` / `drop` to resolve it, as the operator."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

import click

from mesh.patterns.escalation import EscalationState, pending, resolve, summary
from mesh.runtime.client import MeshClient
from mesh.transport import streams
from mesh.transport.auth import Role
from mesh.transport.nats import NatsTransport
from mesh.wire.settings import Settings

Run = Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]


def register(cli: click.Group, settings_fn: Callable[[Role], Settings], run: Run) -> None:
    @cli.group("escalations", invoke_without_command=True)
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per escalation.")
    @click.pass_context
    def escalations(ctx: click.Context, as_json: bool) -> None:
        """List work that failed its last retry and waits for a person: id, agent, message
        type, why, and since when. `mesh escalations retry ID` or `drop ID` resolves one."""
        if ctx.invoked_subcommand is not None:
            return
        settings = settings_fn("operator")

        async def go() -> list[EscalationState]:
            transport = await NatsTransport.connect(settings, "mesh-cli")
            try:
                return await pending(await transport.state(streams.bucket_specs(settings)[1], settings))
            finally:
                await transport.close()

        waiting = run(go)
        for st in waiting:
            row = summary(st)
            if as_json:
                click.echo(json.dumps(row))
            else:
                click.echo(
                    f"{st.id}  {st.agent}  {st.type}  {row['age_s']:.0f}s ago  conversation {st.conversation}"
                    f"\n    {st.reason}"
                )
        if not waiting and not as_json:
            click.echo("no escalations are waiting")

    def _resolve(settings: Settings, escalation: str, retry: bool, to: str, reason: str) -> EscalationState:
        async def go() -> EscalationState:
            client = await MeshClient.connect(settings, "mesh-cli")
            try:
                state = await client.transport.state(streams.bucket_specs(settings)[1], settings)
                return await resolve(client, state, escalation, retry=retry, to=to, reason=reason)
            finally:
                await client.close()

        result: EscalationState = run(go)
        return result

    @escalations.command("retry")
    @click.argument("escalation")
    @click.option("--to", default="", help="Send it to another agent instead (one that handles its type).")
    @click.option("--reason", default="", help="What was fixed, for the record.")
    def retry_cmd(escalation: str, to: str, reason: str) -> None:
        """Send the message again, to its agent or another (with a new id, without its deadline)."""
        st = _resolve(settings_fn("operator"), escalation, True, to, reason)
        click.echo(f"retried {st.id}: {st.type} sent to {st.to} again")

    @escalations.command("drop")
    @click.argument("escalation")
    @click.option("--reason", required=True, help="Why it is given up (kept in escalation.resolved).")
    def drop_cmd(escalation: str, reason: str) -> None:
        """Give the work up."""
        st = _resolve(settings_fn("operator"), escalation, False, "", reason)
        click.echo(f"dropped {st.id}")
