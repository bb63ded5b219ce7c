"""Declaring an agent's consumers before it first runs (`mesh agents add`).

An agent's first replica to start creates its consumers; its events consumer begins with
the events stored after that, so an event published before the agent ever ran never reaches
it. Declaring the agent at deploy time, before anything is published to it, creates the
same consumers from its declaration: when it starts it finds them, with everything
published since.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import click

from mesh.agent.loader import load_agent
from mesh.transport import streams
from mesh.transport.base import Transport
from mesh.transport.nats import NatsTransport
from mesh.transport.streams import ConsumerSpec
from mesh.wire import subjects
from mesh.wire.errors import ConfigError
from mesh.wire.messages import is_type_name
from mesh.wire.settings import Settings


@dataclass(frozen=True, slots=True)
class Declared:
    agent: str
    stream: str
    filters: list[str]
    created: bool  # False: it existed and is kept as it is


async def declare(transport: Transport, specs: list[ConsumerSpec]) -> list[Declared]:
    """Create the consumers in `specs` that do not exist yet. One that exists is kept as it
    is: its agent may be running with it, and its settings are the agent's to change."""
    await transport.ensure_streams()
    existing = {stream: await transport.consumers(stream) for stream in {s.stream for s in specs}}
    out = []
    for spec in specs:
        created = spec.name not in existing[spec.stream]
        if created:
            await transport.ensure_consumer(spec)
        out.append(Declared(spec.name, spec.stream, spec.filters, created))
    return out


def specs_for(targets: tuple[str, ...], events: str, settings: Settings) -> list[ConsumerSpec]:
    """The consumers of agents given as `module:agent` / `file.py:agent`, or by name with
    the event types they handle (`events`, comma-separated)."""
    if events:
        types = [t.strip() for t in events.split(",") if t.strip()]
        for t in types:
            if not is_type_name(t):
                raise ConfigError(
                    f"--events: {t!r} is not a message type name (lower-case dotted words, e.g. "
                    f"support.ticket_opened)"
                )
        specs = []
        for name in targets:
            if ":" in name or name.endswith(".py"):
                raise ConfigError(
                    f"--events is for agents given by name, and {name!r} names code: its handlers "
                    f"say which events it takes. Drop --events, or declare it on its own"
                )
            specs += streams.consumer_specs(subjects.agent_name(name), types, settings)
        return specs
    specs = []
    for target in targets:
        try:
            agent = load_agent(target)
        except ConfigError as exc:
            if ":" in target or target.endswith(".py") or "/" in target:
                raise
            raise ConfigError(
                f"{exc}. To declare an agent whose code is not importable here by its name, give the "
                f"event types it handles: `mesh agents add {target} --events TYPE[,TYPE...]`"
            ) from None
        specs += streams.agent_consumer_specs(agent, settings)
    return specs


def register(
    agents: click.Group,
    settings_fn: Callable[[], Settings],
    run: Callable[[Callable[[], Coroutine[Any, Any, Any]]], Any],
) -> None:
    @agents.command("add")
    @click.argument("targets", nargs=-1, required=True, metavar="SPEC...")
    @click.option(
        "--events",
        default="",
        metavar="TYPE[,TYPE...]",
        help="For agents given by NAME: the event types they handle.",
    )
    def add(targets: tuple[str, ...], events: str) -> None:
        """Create agents' consumers before their first start, so they get every event
        published from now on (an agent's first start otherwise begins with the events
        published after it).

        SPEC is `package.module:agent` or `path/to/file.py:agent`, as for `mesh run`; or,
        with --events, an agent NAME (e.g. of an agent written in another language).
        Consumers that exist are kept as they are.
        """
        settings = settings_fn()
        specs = specs_for(targets, events, settings)

        async def go() -> None:
            transport = await NatsTransport.connect(settings, "mesh-agents")
            try:
                declared = await declare(transport, specs)
                for bucket in streams.bucket_specs(settings):  # agents under auth may not create them
                    await transport.state(bucket, settings)
            finally:
                await transport.close()
            click.echo(f"{'AGENT':<16}{'STREAM':<13}{'CONSUMER':<10}FILTERS")
            for d in declared:
                state = "created" if d.created else "kept"
                click.echo(f"{d.agent:<16}{d.stream:<13}{state:<10}{', '.join(d.filters)}")
            names = ", ".join(sorted({d.agent for d in declared}))
            click.echo(f"messages published from now on wait for {names} until they run")

        run(go)
