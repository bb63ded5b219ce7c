"""Three agents that pass a baton along: first -> second -> third, which answers.

Each runs in its own process in the trace-continuity test.
"""

from __future__ import annotations

import os

from mesh import Agent, Context, Message, message


@message("test.baton", version=1)
class Baton(Message):
    token: str
    path: list[str] = []


@message("test.finished", version=1)
class Finished(Message):
    token: str
    path: list[str]


def _relay(name: str, to: str | None) -> Agent:
    agent = Agent(name, description=f"relays batons to {to or 'the requester'}")

    @agent.handler(events=name == "first")
    async def on_baton(baton: Baton, ctx: Context) -> Finished | None:
        path = [*baton.path, f"{name}:{os.getpid()}"]
        if to is None:
            return Finished(token=baton.token, path=path)
        await ctx.handoff(to, Baton(token=baton.token, path=path))
        return None

    return agent


first = _relay("first", "second")
second = _relay("second", "third")
third = _relay("third", None)
