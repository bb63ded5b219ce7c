"""Research: look the ticket up in the knowledge base and hand the findings to the writer."""

from __future__ import annotations

from mesh.schemas.support import ResearchFindings, ResearchRequest

from mesh import Agent, Context
from mesh.errors import MemoryFault

agent = Agent("research", description="Finds knowledge-base articles relevant to a ticket")

KNOWLEDGE_BASE: dict[str, tuple[str, str]] = {
    "kb-101": ("billing", "Refunds for duplicate charges are issued within 5 business days of the request."),
    "kb-102": ("billing", "Invoices can be downloaded from Settings > Billing > Invoice history."),
    "kb-201": ("account", "Locked accounts unlock automatically 30 minutes after the last failed login."),
    "kb-202": ("account", "Password resets are sent to the account's primary email address."),
    "kb-301": (
        "bug",
        "Export failures with error 500 are fixed in release 4.2; a workaround is exporting by month.",
    ),
    "kb-302": ("bug", "Crash reports can be attached from Help > Send diagnostics."),
    "kb-401": ("how_to", "Data can be exported as CSV from any table view with the Export button."),
    "kb-901": ("other", "Our support hours are 08:00-20:00 CET on weekdays."),
}


def search(category: str, keywords: list[str]) -> list[tuple[str, str]]:
    scored = []
    for doc_id, (doc_category, text) in KNOWLEDGE_BASE.items():
        score = (2 if doc_category == category else 0) + sum(k in text.lower() for k in keywords)
        if score:
            scored.append((score, doc_id, text))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [(doc_id, text) for _, doc_id, text in scored[:3]]


@agent.handler
async def on_request(request: ResearchRequest, ctx: Context) -> None:
    hits = search(request.category, request.keywords)
    findings, sources = [t for _, t in hits], [d for d, _ in hits]
    findings += await _remember_and_recall(request, sources, ctx)
    if len(findings) > len(hits):
        sources.append("memory")
    ctx.log.info("research done", ticket_id=request.ticket.ticket_id, sources=sources)
    await ctx.handoff("writer", ResearchFindings(request=request, findings=findings, sources=sources))


async def _remember_and_recall(request: ResearchRequest, sources: list[str], ctx: Context) -> list[str]:
    """Recall what earlier tickets of this category were answered with, then remember this
    one. Without the memory service the research goes on from the knowledge base alone."""
    ticket = request.ticket
    try:
        earlier = await ctx.memory.recall(
            f"{request.category}: {ticket.subject}", k=3, where={"kind": "episode"}
        )
        await ctx.memory.remember(
            f"Ticket {ticket.ticket_id} ({request.category}) '{ticket.subject}' was answered with "
            f"{', '.join(sources) or 'no article'}.",
            kind="episode",
            meta={"category": request.category, "ticket_id": ticket.ticket_id},
        )
    except MemoryFault as exc:
        ctx.log.warning("memory unavailable; researching without it", error=str(exc))
        return []
    return [f"Earlier: {h.text}" for h in earlier if h.meta.get("category") == request.category][:1]
