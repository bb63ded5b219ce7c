"""An agent's identity on the bus, from its declaration: what it may receive, keep and send
(`mesh.transport.auth.AgentGrant`), and its credentials on the machine that runs the mesh."""

from __future__ import annotations

from mesh.agent.declaration import Agent
from mesh.patterns.escalation import HUMAN
from mesh.transport import streams
from mesh.transport.auth import AgentGrant
from mesh.transport.identities import with_agent, with_role
from mesh.transport.nats import NatsTransport
from mesh.wire.settings import Settings


def grant_of(agent: Agent) -> AgentGrant:
    """What `agent` declares: the event types it handles, its joins, its parked tool calls
    (any tool, its own or an MCP server's: a policy rule may ask for approval of any call,
    mesh.patterns.policy)."""
    approvals = len(agent.tools) > 0 or bool(agent.mcp_servers)
    return AgentGrant(
        name=agent.name,
        events=tuple(streams.event_types(agent)),
        joins=bool(agent.joins),
        approvals=approvals,
        escalates=any(h.escalate == HUMAN for h in agent.handlers),
        memory=agent.memory_scopes,
    )


async def provision(agent: Agent, settings: Settings) -> Settings:
    """The settings `agent` connects with: unchanged when the process was given credentials
    (MESH_NATS_CREDS) or the server needs none; else its own identity from the data dir's
    keyring, issued or updated from its declaration, with the consumers it may not create
    itself (an events consumer with several filters) made as the operator."""
    mine, issued = with_agent(settings, grant_of(agent))
    if issued:
        await make_consumers(agent, with_role(settings, "operator"))
    return mine


async def make_consumers(agent: Agent, operator: Settings, *, url: str | None = None) -> list[str]:
    """Create `agent`'s consumers with the operator's identity (only one with several
    filters needs it: an agent creates the others itself); their names."""
    made = []
    transport = await NatsTransport.connect(operator, "mesh-creds", url=url)
    try:
        for spec in streams.agent_consumer_specs(agent, operator):
            if len(spec.filters) > 1:
                await transport.ensure_consumer(spec)
                made.append(f"{spec.stream}/{spec.name}")
    finally:
        await transport.close()
    return made
