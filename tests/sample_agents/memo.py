"""An agent that writes to and reads from shared memory through `ctx.memory`; started
in-process and as processes (`mesh run tests/sample_agents/memo.py:agent`)."""

from __future__ import annotations

import os

from mesh import Agent, Context, Message, message
from mesh.wire.errors import MemoryFault


@message("memtest.note", version=1)
class Note(Message):
    text: str
    recall: str = ""  # also recall this query after writing
    writer: str = ""


@message("memtest.noted", version=1)
class Noted(Message):
    text: str
    id: str = ""
    error: str = ""  # the MemoryFault kind when memory failed: the handler carried on
    recalled: list[str] = []
    sources: list[str] = []  # provenance "agent/message_id/trace_id" of the recalled hits
    pid: int = 0


agent = Agent("memo", description="Remembers notes, recalls them")


@agent.handler
async def on_note(note: Note, ctx: Context) -> Noted:
    try:
        done = await ctx.memory.remember(note.text, kind="fact", meta={"writer": note.writer})
        hits = await ctx.memory.recall(note.recall, k=3) if note.recall else []
    except MemoryFault as exc:
        return Noted(text=note.text, error=exc.kind, pid=os.getpid())
    return Noted(
        text=note.text,
        id=done.id,
        recalled=[h.text for h in hits],
        sources=[f"{h.provenance.agent}/{h.provenance.message_id}/{h.provenance.trace_id}" for h in hits],
        pid=os.getpid(),
    )
