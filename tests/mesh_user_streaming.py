"""An agent that streams its answer onto the conversation (used by test_streaming)."""

from __future__ import annotations

from mesh import Agent, Context, Message, message


@message("test.question")
class Question(Message, frozen=True):
    text: str


agent = Agent("streamer")


@agent.handler(events=False)
async def on_question(q: Question, ctx: Context) -> None:
    await ctx.stream(system="Answer briefly.", prompt=q.text, max_tokens=100)
