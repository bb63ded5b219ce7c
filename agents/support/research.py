"""Research: look a ticket up in every knowledge source, in parallel.

A request without a source is fanned out to one request per source (the knowledge base,
past tickets, and the mesh's shared memory), which any replica of research may take; their
findings are merged when all answer (or the deadline passes)."""

from __future__ import annotations

import re

from mesh.schemas.support import ResearchFindings, ResearchRequest

from mesh import Agent, Context
from mesh.join import Gathered, merge
from mesh.wire.errors import MemoryFault

agent = Agent(
    "research",
    description="Finds what the knowledge base and past tickets say about a ticket",
    memory_scopes=["customer-*"],  # each customer's memories, and nothing else (docs/memory.md)
)

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

PAST_TICKETS: dict[str, tuple[str, str]] = {
    "T-0817": (
        "billing",
        "A double charge in February was refunded after the customer sent the invoice number.",
    ),
    "T-0902": ("bug", "Monthly exports avoided the error 500 until the customer upgraded to 4.2."),
    "T-0955": ("account", "The customer was locked out; a password reset fixed it right away."),
}

SOURCES = {"kb": KNOWLEDGE_BASE, "history": PAST_TICKETS}
FAN_OUT = [*SOURCES, "memory"]  # the shared semantic memory is the third source


def search(source: str, category: str, keywords: list[str]) -> list[tuple[str, str]]:
    scored = []
    for doc_id, (doc_category, text) in SOURCES[source].items():
        score = (2 if doc_category == category else 0) + sum(k in text.lower() for k in keywords)
        if score:
            scored.append((score, doc_id, text))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [(doc_id, text) for _, doc_id, text in scored[:2]]


def _merge(found: list[ResearchFindings]) -> ResearchFindings:
    found = sorted(found, key=lambda r: FAN_OUT.index(r.request.source))  # not arrival order
    return ResearchFindings(
        request=found[0].request,
        findings=[f for r in found for f in r.findings],
        sources=[s for r in found for s in r.sources],
    )


by_source = agent.join("sources", ResearchFindings, resolve=merge(_merge))


@agent.handler(events=False)
async def on_request(request: ResearchRequest, ctx: Context) -> ResearchFindings | None:
    if not request.source:  # one request per source, in parallel, on any replica
        tasks = [("research", _with_source(request, source)) for source in FAN_OUT]
        await ctx.fan_out(by_source, tasks, deadline=10)
        return None
    if request.source == "memory":
        return await _remember_and_recall(request, ctx)
    hits = search(request.source, request.category, request.keywords)
    ctx.log.info("searched", source=request.source, ticket_id=request.ticket.ticket_id, hits=len(hits))
    return ResearchFindings(request=request, findings=[t for _, t in hits], sources=[d for d, _ in hits])


@by_source.complete
async def all_sources(g: Gathered[ResearchFindings]) -> ResearchFindings | None:
    return g.resolved  # the merged findings answer the request that was fanned out


def _with_source(request: ResearchRequest, source: str) -> ResearchRequest:
    return ResearchRequest(
        ticket=request.ticket,
        category=request.category,
        priority=request.priority,
        summary=request.summary,
        keywords=request.keywords,
        source=source,
    )


def customer_namespace(customer: str) -> str:
    """Each customer's memories in a namespace of their own: one ticket never recalls another
    customer's (the name comes from the ticket's customer field, never from the model)."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", customer.lower()).strip("-.")[:48] or "unknown"
    return f"customer-{slug}"


async def _remember_and_recall(request: ResearchRequest, ctx: Context) -> ResearchFindings:
    """Recall how this customer's earlier tickets of this category went, then remember this
    one. Without the memory service this source finds nothing and the others carry it."""
    ticket = request.ticket
    namespace = customer_namespace(ticket.customer)
    try:
        earlier = await ctx.memory.recall(
            f"{request.category}: {ticket.subject}", k=3, namespace=namespace, where={"kind": "episode"}
        )
        await ctx.memory.remember(
            f"Ticket {ticket.ticket_id} ({request.category}) '{ticket.subject}': {request.summary}",
            kind="episode",
            namespace=namespace,
            meta={"category": request.category, "ticket_id": ticket.ticket_id},
        )
    except MemoryFault as exc:
        ctx.log.warning("memory unavailable; researching without it", error=str(exc))
        return ResearchFindings(request=request, findings=[], sources=[])
    same = [h for h in earlier if h.meta.get("category") == request.category][:1]
    return ResearchFindings(
        request=request, findings=[f"Earlier: {h.text}" for h in same], sources=["memory"] if same else []
    )
