"""Research: look the ticket up in the knowledge base and hand the findings to the writer."""

from __future__ import annotations

from mesh.schemas.support import ResearchFindings, ResearchRequest

from mesh import Agent, Context

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
    ctx.log.info("research done", ticket_id=request.ticket.ticket_id, sources=[d for d, _ in hits])
    await ctx.handoff(
        "writer",
        ResearchFindings(request=request, findings=[t for _, t in hits], sources=[d for d, _ in hits]),
    )
