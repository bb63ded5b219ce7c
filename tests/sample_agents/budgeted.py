"""An agent that asks the model once per question and says which process answered: two of
its processes share a conversation's model budget (tests/test_budget.py). Started with
`mesh run tests/sample_agents/budgeted.py:agent`."""

from __future__ import annotations

import os

from mesh import Agent, Context, Message, message


@message("test.budget_question", version=1)
class Question(Message):
    prompt: str


@message("test.budget_answer", version=1)
class Answer(Message):
    text: str
    pid: int


agent = Agent("budgeted", description="Asks the model once per question")


@agent.handler
async def on_question(question: Question, ctx: Context) -> Answer:
    text = await ctx.llm.complete(system="Answer briefly.", prompt=question.prompt)
    return Answer(text=text, pid=os.getpid())
