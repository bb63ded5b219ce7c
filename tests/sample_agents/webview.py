"""The agents of the web view's browser test (tests/test_webview.py): an intake that hands an
order to the clerk (tests/mesh_user_tools.py), whose refund waits for a person's approval,
and announces the clerk's answer as an event."""

from __future__ import annotations

from mesh_user_tools import Answered, Ask

from mesh import Agent, Context, Message, message


@message("test.web_order")
class WebOrder(Message, frozen=True):
    order: str
    note: str


@message("test.web_done")
class WebDone(Message, frozen=True):
    answer: str
    calls: list[str]


intake = Agent("intake", description="takes an order from the web and asks the clerk to refund it")


@intake.handler(events=False)
async def on_order(order: WebOrder, ctx: Context) -> None:
    refund = f'refund({{"order_id": "{order.order}", "amount_eur": 20}})'
    text = f"Customer note: {order.note}. Please call {refund}"
    await ctx.send("clerk", Ask(text=text))


@intake.handler(events=False)
async def on_answered(answer: Answered, ctx: Context) -> None:
    await ctx.publish(WebDone(answer=answer.text, calls=answer.calls))
