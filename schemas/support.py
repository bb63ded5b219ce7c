"""Customer-support messages: the demo's ticket flow (triage -> research + policy -> writer)."""

from __future__ import annotations

from typing import Literal

from mesh.wire.messages import Message, message

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
    source: str = ""  # "" asks for every source; research fans out one request per source


@message("support.research_findings", version=1)
class ResearchFindings(Message):
    """What research found, handed to the writer."""

    request: ResearchRequest
    findings: list[str]
    sources: list[str] = []
    notes: list[str] = []  # policy notes the writer must respect


@message("support.policy_note", version=1)
class PolicyNote(Message):
    """What the policy agent says applies to a ticket (refund rules, escalation)."""

    ticket_id: str
    rules: list[str]
    escalate: bool = False


@message("support.reply_drafted", version=1)
class ReplyDrafted(Message):
    """The reply the writer proposes to send to the customer: the end of the flow."""

    ticket_id: str
    category: Category
    priority: Priority
    reply: str
    sources: list[str] = []
    model: str = ""
    actions: list[str] = []  # what the writer's tools did (e.g. a refund, once approved)
