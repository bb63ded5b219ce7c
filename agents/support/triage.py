"""Triage: classify a new ticket, set its priority, and hand it to research."""

from __future__ import annotations

from mesh.schemas.support import Category, Priority, ResearchRequest, TicketOpened

from mesh import Agent, Context

agent = Agent("triage", description="Classifies new support tickets and sets their priority")

_CATEGORIES: list[tuple[Category, tuple[str, ...]]] = [
    ("billing", ("invoice", "charge", "refund", "billing", "payment", "card")),
    ("account", ("login", "password", "account", "2fa", "locked", "email address")),
    ("bug", ("error", "crash", "broken", "bug", "fails", "exception", "500")),
    ("how_to", ("how do i", "how to", "can i", "where is", "export")),
]
_URGENT = ("urgent", "asap", "down", "outage", "production", "immediately")


def classify(text: str) -> tuple[Category, Priority, list[str]]:
    lowered = text.lower()
    matches = ((c, [w for w in words if w in lowered]) for c, words in _CATEGORIES)
    category, hits = next(((c, hits) for c, hits in matches if hits), ("other", []))
    priority: Priority = "urgent" if any(w in lowered for w in _URGENT) else "normal"
    if category == "billing" and priority == "normal":
        priority = "high"
    return category, priority, hits


@agent.handler
async def on_ticket(ticket: TicketOpened, ctx: Context) -> None:
    category, priority, keywords = classify(f"{ticket.subject}\n{ticket.body}")
    summary = await ctx.llm.complete(
        system="You summarise support tickets in one sentence for a colleague.",
        prompt=f"Subject: {ticket.subject}\n\n{ticket.body}",
        max_tokens=80,
    )
    ctx.log.info("ticket triaged", ticket_id=ticket.ticket_id, category=category, priority=priority)
    await ctx.handoff(
        "research",
        ResearchRequest(
            ticket=ticket, category=category, priority=priority, summary=summary, keywords=keywords
        ),
    )
