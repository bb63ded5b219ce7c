"""The agents of the look-back tests (tests/test_lookback.py): a planner that fans a case
out to two checks (the second fails its first delivery), then asks the clerk
(tests/mesh_user_tools.py) for a refund that needs an approval."""

from __future__ import annotations

from mesh_user_tools import Answered, Ask

from mesh import Agent, Context, Message, message
from mesh.join import Gathered


@message("test.case")
class Case(Message, frozen=True):
    order: str


@message("test.check")
class Check(Message, frozen=True):
    order: str
    n: int


@message("test.checked")
class Checked(Message, frozen=True):
    order: str
    n: int
    ok: bool


planner = Agent("planner", description="checks an order twice, then asks the clerk to refund it")
checks = planner.join("checks", Checked)
checker = Agent("checker", description="checks one thing about an order")
FAILED_ONCE: set[str] = set()


@planner.handler(events=False)
async def on_case(case: Case, ctx: Context) -> None:
    await ctx.fan_out(checks, [("checker", Check(order=case.order, n=i)) for i in range(2)])


@checks.complete
async def checked(g: Gathered[Checked], ctx: Context) -> None:
    order = g.results[0].order
    await ctx.send("clerk", Ask(text=f'Please call refund({{"order_id": "{order}", "amount_eur": 20}})'))


@planner.handler(events=False)
async def on_answered(answer: Answered, ctx: Context) -> None:
    ctx.log.info("the clerk answered", text=answer.text)


@checker.handler(events=False)
async def on_check(check: Check, ctx: Context) -> Checked:
    if check.n == 1 and ctx.message_id not in FAILED_ONCE:  # the first delivery fails: a redelivery
        FAILED_ONCE.add(ctx.message_id)
        raise RuntimeError("the order service timed out")
    return Checked(order=check.order, n=check.n, ok=True)
