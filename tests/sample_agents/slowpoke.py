"""An agent whose work takes long, to be cancelled (tests/test_cancel.py): a tool that waits
30 s, or a model that never answers. It leaves marks in SLOWPOKE_DIR: `started-<n>` when a
task begins, `tool-cancelled-<n>` when the tool's wait is cut short, `finished-<n>` if a
task ever ends."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import msgspec

from mesh import Agent, Context, Message, message


@message("test.slow_task", version=1)
class SlowTask(Message, frozen=True):
    n: int
    mode: str  # "tool" or "model"


@message("test.slow_done", version=1)
class SlowDone(Message, frozen=True):
    n: int


class Wait(msgspec.Struct, frozen=True):
    n: int


agent = Agent("slowpoke", description="takes its time")


def _mark(name: str) -> None:
    Path(os.environ["SLOWPOKE_DIR"], name).write_text("")


@agent.tool(timeout=60)
async def wait_for_it(w: Wait) -> str:
    """Wait for a long time."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        _mark(f"tool-cancelled-{w.n}")
        raise
    return "waited"


@agent.handler(events=False)
async def on_task(task: SlowTask, ctx: Context) -> SlowDone:
    _mark(f"started-{task.n}")
    if task.mode == "tool":
        await ctx.run_tools(system="You wait.", prompt=f'Please call wait_for_it({{"n": {task.n}}})')
    else:
        await ctx.llm.complete(system="You answer.", prompt="take your time")
    _mark(f"finished-{task.n}")
    await ctx.send("slowpoke", SlowTask(n=task.n + 100, mode=task.mode))  # a handoff it never reaches
    return SlowDone(n=task.n)
