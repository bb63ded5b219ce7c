"""Triage: classify a new ticket, set its priority, and supervise the case: research and
policy work on it in parallel, and when both have answered (or the deadline passed) triage
hands the brief to the writer."""

from __future__ import annotations

from mesh.schemas.support import (
    Category,
    PolicyNote,
    Priority,
    ResearchFindings,
    ResearchRequest,
    TicketOpened,
)

from mesh import Agent, Context
from mesh.join import Gathered

agent = Agent("triage", description="Classifies new support tickets and supervises each case")
case = agent.join("case", ResearchFindings, PolicyNote)

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
    request = ResearchRequest(
        ticket=ticket, category=category, priority=priority, summary=summary, keywords=keywords
    )
    await ctx.delegate(case, [("research", request), ("policy", request)], deadline=20)


@case.complete
async def brief_the_writer(g: Gathered[ResearchFindings | PolicyNote], ctx: Context) -> None:
    found = next((m for m in g.results if isinstance(m, ResearchFindings)), None)
    policy = next((m for m in g.results if isinstance(m, PolicyNote)), None)
    if found is None:  # research missed the deadline: the writer works from the ticket alone
        ctx.log.warning("no research in time", missing=g.missing)
        return
    notes = list(policy.rules) if policy else []
    if policy and policy.escalate:
        notes.append("Tell the customer a specialist is looking at this now.")
    await ctx.handoff(
        "writer",
        ResearchFindings(request=found.request, findings=found.findings, sources=found.sources, notes=notes),
    )
