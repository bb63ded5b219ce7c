"""A new version of the look-back checker (tests/sample_agents/lookback.py) that changed
its mind: every check now fails (`ok` is false). Replaying a recorded conversation through
it must report that field."""

from __future__ import annotations

from mesh import Agent, Context
from sample_agents.lookback import Check, Checked

checker = Agent("checker", description="checks one thing about an order, more strictly")


@checker.handler(events=False)
async def on_check(check: Check, ctx: Context) -> Checked:
    return Checked(order=check.order, n=check.n, ok=False)
