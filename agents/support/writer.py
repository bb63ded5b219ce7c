"""Writer: draft the reply to the customer from the research findings, with tools.

The model may look up the customer's account, and may issue a refund for a double charge:
a high-risk tool, so a person approves each refund before it runs. While it waits, the work
is parked durably and the handler returns; on the decision the handler runs again and the
tool loop goes on from the parked call. The reply is streamed onto the conversation as it
is generated (`mesh tap` shows it growing)."""

from __future__ import annotations

import json

import msgspec
from mesh.schemas.support import ReplyDrafted, ResearchFindings

from mesh import Agent, Context

agent = Agent(
    "writer",
    description="Drafts customer replies from research findings",
    permissions=["accounts:read", "payments:write"],
)

SYSTEM = (
    "You write short, friendly replies to customer support tickets. Use only the notes given. "
    "Use the tools when the notes ask for it: look the account up before you promise anything, "
    "and issue a refund only for a double charge."
)


class AccountQuery(msgspec.Struct, frozen=True):
    customer: str


class Refund(msgspec.Struct, frozen=True):
    customer: str
    ticket_id: str
    reason: str


ACCOUNTS = {"Ada": "plan Pro, paid monthly by card, two charges on the March invoice"}


@agent.tool(permissions=["accounts:read"], timeout=5)
async def lookup_account(q: AccountQuery) -> str:
    """Find a customer's account and say what the billing system shows."""
    return ACCOUNTS.get(q.customer, f"no billing issue on record for {q.customer}")


@agent.tool(permissions=["payments:write"], approval=True, timeout=10)
async def issue_refund(r: Refund) -> str:
    """Refund the duplicate charge of a ticket. A person approves each call."""
    return f"refund for {r.ticket_id} issued to {r.customer}"


@agent.handler
async def on_findings(found: ResearchFindings, ctx: Context) -> ReplyDrafted | None:
    ticket = found.request.ticket
    notes = "\n".join(f"- {f}" for f in [*found.findings, *found.notes]) or "- (nothing found)"
    steps = []
    if found.request.category == "billing":  # what a clerk would do; the model is told to
        steps.append(f"call lookup_account({json.dumps({'customer': ticket.customer})})")
        refund = {"customer": ticket.customer, "ticket_id": ticket.ticket_id, "reason": "double charge"}
        steps.append(f"call issue_refund({json.dumps(refund)})")
    plan = ("\n\nSteps:\n" + "\n".join(steps)) if steps else ""
    run = await ctx.run_tools(
        system=SYSTEM,
        prompt=f"Customer: {ticket.customer}\nTicket: {ticket.subject}\n\nNotes:\n{notes}{plan}",
        data={"ticket": ticket.body},  # the customer's own words: untrusted
        stream=True,
        max_tokens=300,
    )
    if run.parked:
        ctx.log.info("refund waits for approval", approval=run.parked, ticket_id=ticket.ticket_id)
        return None  # the handler runs again when a person decides
    done = [c.output for c in run.calls if c.ok]
    reply = (
        f'Hi {ticket.customer},\n\nThanks for writing about "{ticket.subject}". {run.text}\n\nSupport team'
    )
    ctx.log.info("reply drafted", ticket_id=ticket.ticket_id, chars=len(reply), tools=len(run.calls))
    return ReplyDrafted(
        ticket_id=ticket.ticket_id,
        category=found.request.category,
        priority=found.request.priority,
        reply=reply,
        sources=found.sources,
        model=ctx.llm.name,
        actions=done,
    )
