"""A small agent file, started by tests with `mesh run tests/sample_agents/echo.py:agent`."""

from __future__ import annotations

import asyncio
import os

from mesh import Agent, Context, Message, message


@message("test.ping", version=1)
class Ping(Message):
    text: str
    n: int = 0


@message("test.pong", version=1)
class Pong(Message):
    text: str
    n: int
    pid: int
    instance: str


agent = Agent("echo", description="Answers every ping with a pong")


@agent.handler
async def on_ping(ping: Ping, ctx: Context) -> Pong:
    if ping.text == "slow":  # announce, then take a while: used to test draining on SIGTERM
        await ctx.publish(Pong(text="started", n=ping.n, pid=os.getpid(), instance=ctx.instance))
        await asyncio.sleep(1.0)
    return Pong(text=ping.text, n=ping.n, pid=os.getpid(), instance=ctx.instance)
