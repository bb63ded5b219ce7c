"""An agent whose handler asks the model, says so, then waits for a gate file: a test kills
its process there (kill -9) and lets a replica take the redelivered message.
Started with `mesh run tests/sample_agents/journaled.py:agent`."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from mesh import Agent, Context, Message, message


@message("test.journal_task", version=1)
class Task(Message):
    prompt: str
    gate: str  # a file: the handler waits until it exists (at most a minute)


@message("test.journal_asked", version=1)
class Asked(Message):
    """The model answered (and the answer is journaled): the handler now waits at the gate."""

    text: str
    pid: int


@message("test.journal_done", version=1)
class Done(Message):
    text: str
    pid: int


agent = Agent("journaled", description="Asks the model once per task, then waits at a gate")


@agent.handler
async def on_task(task: Task, ctx: Context) -> Done:
    text = await ctx.llm.complete(system="Answer briefly.", prompt=task.prompt)
    await ctx.publish(Asked(text=text, pid=os.getpid()))
    await ctx.flush()
    gate = Path(task.gate)
    for _ in range(1200):
        if await asyncio.to_thread(gate.exists):
            break
        await asyncio.sleep(0.05)
    return Done(text=text, pid=os.getpid())
