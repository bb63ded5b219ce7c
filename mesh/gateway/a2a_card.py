"""Agent Cards from the mesh's discovery: what each running agent says about itself (name,
description, version, the message types it handles) as an A2A card, one per agent.

Discovery is a broadcast that waits for answers, so its result is kept for `FRESH` seconds:
many card fetches (or messages) cost one broadcast, whatever names they ask for.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from a2a.types import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentSkill,
    HTTPAuthSecurityScheme,
    SecurityRequirement,
    SecurityScheme,
    StringList,
)
from a2a.utils.constants import PROTOCOL_VERSION_1_0, TransportProtocol

from mesh.gateway.a2a_parts import describe, handled_types, only_text_field
from mesh.runtime.discovery import AgentInstance, discover
from mesh.transport.base import Transport
from mesh.transport.keys import KeyDirectory

FRESH: Final = 5.0  # seconds a discovery answers card and message lookups
RETRY: Final = 1.0  # seconds before a name discovery did not show is looked for again
WAIT: Final = 0.3  # seconds a discovery gathers answers
SCHEME: Final = "bearer"
JSONRPC: Final = TransportProtocol.JSONRPC.value
MODES: Final = ["application/json", "text/plain"]


class Agents:
    """The running agents, by name, as discovery last saw them (at most `FRESH` s ago)."""

    def __init__(self, transport: Transport, directory: KeyDirectory | None) -> None:
        self.transport = transport
        self.directory = directory
        self._seen: dict[str, AgentInstance] = {}
        self._at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> AgentInstance | None:
        async with self._lock:  # one broadcast at a time, whoever asks
            age = time.monotonic() - self._at
            if age > FRESH or (name not in self._seen and age > RETRY):  # a new agent, soon
                found = await discover(self.transport, timeout=WAIT, directory=self.directory)
                self._seen = {a.name: a for a in found}
                self._at = time.monotonic()
            return self._seen.get(name)


def agent_card(agent: AgentInstance, url: str) -> AgentCard:
    """The card of one mesh agent whose JSON-RPC endpoint is `url`: a skill per message type
    it handles (those declared on this gateway), the gateway's bearer scheme required."""
    skills = [
        AgentSkill(
            id=str(t),
            name=t.name,
            description=describe(t),
            tags=["mesh", t.name.split(".")[0]],
            input_modes=MODES if only_text_field(t) is not None else MODES[:1],
            output_modes=MODES,
        )
        for t in handled_types(agent.handles)
    ]
    return AgentCard(
        name=agent.name,
        description=agent.description or f"The mesh agent {agent.name}",
        version=agent.version or "0",
        supported_interfaces=[
            AgentInterface(
                url=url,
                protocol_binding=TransportProtocol.JSONRPC.value,
                protocol_version=PROTOCOL_VERSION_1_0,
            )
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        security_schemes={
            SCHEME: SecurityScheme(
                http_auth_security_scheme=HTTPAuthSecurityScheme(
                    scheme="bearer", description="a token of the gateway's --tokens file"
                )
            )
        },
        security_requirements=[SecurityRequirement(schemes={SCHEME: StringList()})],
        default_input_modes=MODES,
        default_output_modes=MODES,
        skills=skills,
    )


def handler_card() -> AgentCard:
    """The card the SDK's request handler checks capabilities against (the same for every
    agent: streaming, no push notifications)."""
    return AgentCard(
        name="mesh",
        description="mesh agents over A2A",
        version="1",
        supported_interfaces=[
            AgentInterface(url="/a2a", protocol_binding=JSONRPC, protocol_version=PROTOCOL_VERSION_1_0)
        ],
        capabilities=AgentCapabilities(streaming=True, push_notifications=False),
        default_input_modes=MODES,
        default_output_modes=MODES,
        skills=[
            AgentSkill(id="mesh", name="mesh", description="each agent's card has its own", tags=["mesh"])
        ],
    )
