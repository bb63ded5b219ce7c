"""An agent that handles an event type, declared with `mesh agents add` before it first runs."""

from __future__ import annotations

from mesh import Agent, Message, message


@message("test.invoice_paid", version=1)
class InvoicePaid(Message):
    invoice: str


@message("test.invoice_booked", version=1)
class InvoiceBooked(Message):
    invoice: str


agent = Agent("ledger", description="Books paid invoices")


@agent.handler
async def on_paid(paid: InvoicePaid) -> InvoiceBooked:
    return InvoiceBooked(invoice=paid.invoice)
