"""Policy: which support rules apply to a ticket, and whether a person must look at it."""

from __future__ import annotations

from mesh.schemas.support import PolicyNote, ResearchRequest

from mesh import Agent

agent = Agent("policy", description="Says which support rules apply to a ticket")

RULES = {
    "billing": ["Refunds over 100 EUR need a team lead's approval.", "Never promise a date for a refund."],
    "bug": ["Link the public status page for known incidents."],
    "account": ["Never send passwords or reset links by reply; point to the reset page."],
}


@agent.handler(events=False)
async def on_request(request: ResearchRequest) -> PolicyNote:
    return PolicyNote(
        ticket_id=request.ticket.ticket_id,
        rules=RULES.get(request.category, []),
        escalate=request.priority == "urgent",
    )
