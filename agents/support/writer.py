"""Writer: draft the reply to the customer from the research findings."""

from __future__ import annotations

from mesh.schemas.support import ReplyDrafted, ResearchFindings

from mesh import Agent, Context

agent = Agent("writer", description="Drafts customer replies from research findings")


@agent.handler
async def on_findings(found: ResearchFindings, ctx: Context) -> ReplyDrafted:
    ticket = found.request.ticket
    notes = "\n".join(f"- {f}" for f in [*found.findings, *found.notes]) or "- (nothing found)"
    body = await ctx.llm.complete(
        system="You write short, friendly replies to customer support tickets. Use only the notes given.",
        prompt=f"Customer: {ticket.customer}\nTicket: {ticket.subject}\n{ticket.body}\n\nNotes:\n{notes}",
        max_tokens=300,
    )
    reply = f'Hi {ticket.customer},\n\nThanks for writing about "{ticket.subject}". {body}\n\nSupport team'

    ctx.log.info("reply drafted", ticket_id=ticket.ticket_id, chars=len(reply))
    return ReplyDrafted(
        ticket_id=ticket.ticket_id,
        category=found.request.category,
        priority=found.request.priority,
        reply=reply,
        sources=found.sources,
        model=ctx.llm.name,
    )
