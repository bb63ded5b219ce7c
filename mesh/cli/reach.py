"""Who a stored message reaches, and where it waits meanwhile (`mesh publish` warns).

A message to an agent's inbox waits in ``MESH_INBOX`` until a replica of the agent takes
it, even if the agent has never run: the inbox consumer its first replica creates starts
with the oldest message. An event reaches only the agents whose events consumer exists when
it is stored; a consumer created later (an agent's first start) begins with the events
published after it. `mesh agents add` creates an agent's consumers before its first start.
"""

from __future__ import annotations

import asyncio
import difflib
from dataclasses import dataclass

from mesh.runtime.discovery import is_running
from mesh.transport import streams
from mesh.transport.base import Transport
from mesh.wire import subjects


@dataclass(frozen=True, slots=True)
class Reach:
    stream: str
    takers: list[str]  # consumers (agents) that will get the message
    running: list[str]  # the takers with a replica up now
    known: list[str]  # every consumer of the stream, to suggest on a misspelt agent


async def reach(transport: Transport, address: subjects.Address) -> Reach:
    """Who gets a message stored at `address` (an inbox or an event)."""
    stream = streams.INBOX if address.kind == subjects.AGENT else streams.EVENTS
    everyone = await transport.consumers(stream)
    subject = address.subject
    takers = sorted(
        n for n, patterns in everyone.items() if any(subjects.matches(p, subject) for p in patterns)
    )
    up = await asyncio.gather(*(is_running(transport, name) for name in takers))
    running = [name for name, yes in zip(takers, up, strict=True) if yes]
    return Reach(stream, takers, running, sorted(everyone))


def warning(address: subjects.Address, found: Reach) -> str | None:
    """What to tell the sender when no running agent gets the message; None if one does."""
    if found.running:
        return None
    if address.kind == subjects.AGENT:
        agent = address.target
        if found.takers:
            return (
                f"no replica of agent {agent!r} is running: the message waits in {found.stream} "
                f"until one starts (`mesh run module:agent`)"
            )
        close = difflib.get_close_matches(agent, found.known, n=1)
        hint = f" Did you mean `agent:{close[0]}`?" if close else ""
        return (
            f"no agent named {agent!r} has run on this server or been declared with `mesh agents add`: "
            f"the message waits in {found.stream} until one starts.{hint} If the name is wrong, "
            f"nothing will ever take it: remove it with "
            f"`nats stream purge {found.stream} --subject {address.subject}`"
        )
    type_name = address.target
    if found.takers:
        return (
            f"no agent that handles {type_name} is running: the event waits in {found.stream} "
            f"for {', '.join(found.takers)}, which get it when they start"
        )
    return (
        f"no agent handles {type_name}: the event is stored in {found.stream} (for "
        f"MESH_EVENT_RETENTION) but reaches no agent, not even one started later, because an "
        f"agent receives the events stored after its first start. Declare the agents that "
        f"handle it before publishing: `mesh agents add module:agent`"
    )
