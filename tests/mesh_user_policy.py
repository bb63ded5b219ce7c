"""A cashier agent for the policy tests: its refund tool is not marked ``approval=True``;
a policy rule decides which refunds wait for a person."""

from __future__ import annotations

from mesh_user_tools import Answered, Ask, OrderQuery, Refund

from mesh import Agent, Context

REFUNDED: list[Refund] = []

agent = Agent("cashier", permissions=["orders:read", "payments:write"])


@agent.tool(permissions=["orders:read"])
async def lookup_order(q: OrderQuery) -> str:
    """Find an order by its id and say where it is."""
    return f"Order {q.order_id} shipped on Monday"


@agent.tool(permissions=["payments:write"])
async def refund(r: Refund) -> str:
    """Refund an order."""
    REFUNDED.append(r)
    return f"Refunded {r.amount_eur:g} EUR on {r.order_id}"


@agent.handler(events=False)
async def on_ask(ask: Ask, ctx: Context) -> Answered | None:
    run = await ctx.run_tools(system="You are a cashier.", prompt=ask.text, data=ask.data)
    if run.parked:
        return None
    return Answered(
        text=run.text,
        calls=[c.tool for c in run.calls if c.ok],
        errors=[f"{c.tool}:{c.error_kind}" for c in run.calls if not c.ok],
    )
