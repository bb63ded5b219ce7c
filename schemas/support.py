"""Customer-support messages: the demo's ticket flow (triage -> research -> draft)."""

from __future__ import annotations

from typing import Literal

from mesh.messages import Message, message

Priority = Literal["low", "normal", "high", "urgent"]
Category = Literal["billing", "account", "bug", "how_to", "other"]


@message("support.ticket_opened", version=1)
class TicketOpened(Message):
    """A customer opened a ticket (published by the helpdesk, an external system)."""

    ticket_id: str
    customer: str
    subject: str
    body: str
    channel: str = "email"


@message("support.research_request", version=1)
class ResearchRequest(Message):
    """Triage asks research to find what the knowledge base says about a ticket."""

    ticket: TicketOpened
    category: Category
    priority: Priority
    summary: str
    keywords: list[str] = []


@message("support.research_findings", version=1)
class ResearchFindings(Message):
    """What research found, handed to the writer."""

    request: ResearchRequest
    findings: list[str]
    sources: list[str] = []


@message("support.reply_drafted", version=1)
class ReplyDrafted(Message):
    """The reply the writer proposes to send to the customer: the end of the flow."""

    ticket_id: str
    category: Category
    priority: Priority
    reply: str
    sources: list[str] = []
    model: str = ""
