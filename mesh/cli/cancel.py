"""`mesh cancel <conversation>`: stop a conversation's running work on every agent process
(mesh.runtime.cancel), as the operator."""

from __future__ import annotations

import asyncio
import getpass
from collections.abc import Callable, Coroutine
from typing import Any

import click
import msgspec

from mesh.runtime.cancel import Answer, Cancel, announce
from mesh.transport.auth import Role
from mesh.transport.nats import NatsTransport
from mesh.wire import subjects
from mesh.wire.settings import Settings

Run = Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any]


def register(cli: click.Group, settings_fn: Callable[[Role], Settings], run: Run) -> None:
    @cli.command("cancel")
    @click.argument("conversation_id")
    @click.option("--reason", default="", help="Why: kept in the dead letters of what it stops.")
    @click.option("--wait", default=1.0, show_default=True, help="Seconds to gather the agents' answers.")
    def cancel(conversation_id: str, reason: str, wait: float) -> None:
        """Stop a conversation: every agent process cancels its running handlers of it (their
        model calls and tools with them) and refuses what still arrives for it. What they
        were handling is dead-lettered as `cancelled`."""
        settings = settings_fn("operator")
        conv = subjects.conversation_id(conversation_id)

        async def go() -> list[Answer]:
            transport = await NatsTransport.connect(settings, "mesh-cancel")
            answers: list[Answer] = []
            try:
                inbox = transport.new_inbox()

                async def heard(msg: Any) -> None:
                    try:
                        answers.append(msgspec.json.decode(msg.data, type=Answer))
                    except msgspec.DecodeError:
                        return

                sub = await transport.subscribe(inbox, heard)
                body = msgspec.json.encode(Cancel(reason=reason, by=getpass.getuser()))
                await announce(transport, conv, body, reply=inbox)
                await transport.flush()
                await asyncio.sleep(wait)
                await sub.unsubscribe()
            finally:
                await transport.close()
            return answers

        answers = run(go)
        stopped = sum(a.cancelled for a in answers)
        agents = sorted({a.agent for a in answers})
        click.echo(
            f"cancelled conversation {conv}: {stopped} running handler(s) stopped; "
            f"{len(answers)} agent process(es) will refuse the rest ({', '.join(agents) or 'none answered'})"
        )
