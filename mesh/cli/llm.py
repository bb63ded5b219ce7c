"""`mesh tools`, `mesh approve` and `mesh deny`: the tools agents offer, and decisions on
tool calls that wait for a person (docs/llm-and-tools.md)."""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Callable, Coroutine
from typing import Any

import click

from mesh.patterns.approval import pending
from mesh.patterns.deciding import decide  # where `mesh approve` and its callers find it
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import discover
from mesh.transport import streams
from mesh.transport.keys import KeyDirectory, known_directory
from mesh.transport.nats import NatsTransport
from mesh.wire.settings import Settings

__all__ = ["decide", "list_tools", "register"]


async def list_tools(
    transport: NatsTransport, *, wait: float = 0.5, directory: KeyDirectory | None = None
) -> list[dict[str, Any]]:
    """Every tool offered by a running agent, with its agent, from discovery metadata (with a
    `directory`, only what agents signed themselves)."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for inst in await discover(transport, timeout=wait, directory=directory):
        for tool in json.loads(inst.metadata.get("mesh.tools") or "[]"):
            seen.setdefault((inst.name, tool["name"]), {"agent": inst.name, **tool})
    return [seen[k] for k in sorted(seen)]


def _sandbox_line(box: dict[str, Any]) -> str:
    """A tool's sandbox, as `mesh tools` shows it."""
    limits = [
        f"{label} {box[key]}{unit}" if box.get(key) is not None else f"{label} unlimited"
        for key, label, unit in (
            ("cpu_seconds", "cpu", "s"),
            ("memory_mb", "memory", " MB"),
            ("open_files", "files", ""),
            ("processes", "processes", ""),
        )
    ]
    network = "network on" if box.get("network") else "no network"
    return f"sandboxed: {', '.join(limits)}, {network}, env {' '.join(box.get('env') or []) or '(none)'}"


def register(
    cli: click.Group,
    settings_fn: Callable[[], Settings],
    run: Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any],
) -> None:
    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per tool.")
    @click.option("--wait", default=0.5, show_default=True, help="Seconds to gather answers.")
    def tools(as_json: bool, wait: float) -> None:
        """List the tools running agents offer, with their JSON Schemas."""
        settings = settings_fn()

        async def go() -> None:
            transport = await NatsTransport.connect(settings, "mesh-cli")
            try:
                found = await list_tools(transport, wait=wait, directory=known_directory(settings))
            finally:
                await transport.close()
            if as_json:
                for t in found:
                    click.echo(json.dumps(t))
                return
            if not found:
                click.echo("no running agent offers tools")
            for t in found:
                flags = [f"needs {', '.join(t['permissions'])}"] if t["permissions"] else []
                flags += ["approval required"] if t["approval"] else []
                flags += [_sandbox_line(t["sandbox"])] if t.get("sandbox") else []
                click.echo(f"{t['agent']}.{t['name']}  {t['description'].splitlines()[0]}")
                if flags:
                    click.echo(f"    ({'; '.join(flags)})")
                click.echo(f"    input: {json.dumps(t['input_schema'])}")

        run(go)

    def _decide(approval: str, approved: bool, by: str, reason: str) -> None:
        settings = settings_fn()

        async def go() -> None:
            async with await MeshClient.connect(settings, "mesh-cli") as client:
                st = await decide(client, settings, approval, approved=approved, by=by, reason=reason)
            verb = "approved" if approved else "denied"
            click.echo(f"{verb} {approval}: {st.agent} may{'' if approved else ' not'} run {st.tool}")

        run(go)

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="One JSON object per approval.")
    def approvals(as_json: bool) -> None:
        """List the tool calls waiting for a decision: id, age, agent, tool and arguments."""
        settings = settings_fn()

        async def go() -> None:
            transport = await NatsTransport.connect(settings, "mesh-cli")
            try:
                waiting = await pending(await transport.state(streams.bucket_specs(settings)[1], settings))
            finally:
                await transport.close()
            now_ms = time.time() * 1000
            for st in waiting:
                row = {
                    "id": st.id,
                    "agent": st.agent,
                    "tool": st.tool,
                    "arguments": st.call.input,
                    "conversation": st.conversation,
                    "age_s": round((now_ms - st.parked_ms) / 1000, 1) if st.parked_ms else None,
                    "expires_in_s": round((st.expires_ms - now_ms) / 1000, 1),
                }
                if as_json:
                    click.echo(json.dumps(row))
                    continue
                age = f"{row['age_s']:.0f}s ago" if st.parked_ms else "age unknown"
                args = json.dumps(st.call.input)
                args = args if len(args) <= 200 else args[:200] + "..."
                click.echo(
                    f"{st.id}  {st.agent}.{st.tool}  {age}, expires in {row['expires_in_s']:.0f}s  "
                    f"conversation {st.conversation}\n    arguments: {args}"
                )
            if not waiting and not as_json:
                click.echo("no tool call is waiting for a decision")

        run(go)

    @cli.command()
    @click.argument("approval")
    @click.option("--by", default=None, help="Who decides (default: the current user).")
    @click.option("--reason", default="", help="Why (kept with the decision).")
    def approve(approval: str, by: str | None, reason: str) -> None:
        """Approve the tool call waiting under APPROVAL (from the approval.request event)."""
        _decide(approval, True, by or getpass.getuser(), reason)

    @cli.command()
    @click.argument("approval")
    @click.option("--reason", required=True, help="Why; the agent's model is told.")
    @click.option("--by", default=None, help="Who decides (default: the current user).")
    def deny(approval: str, reason: str, by: str | None) -> None:
        """Deny the tool call waiting under APPROVAL."""
        _decide(approval, False, by or getpass.getuser(), reason)
