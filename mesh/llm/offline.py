"""The offline provider: deterministic, no network, no model files; the default without a key.

Text: the prompt's bullet points (lines starting ``- ``) joined into prose, or else the first
sentence of the prompt's last paragraph, then what tools returned.

Tools: it follows every instruction of the form ``call name({...json...})`` it finds in the
conversation, in order, one per turn, wherever the instruction appears (the user's prompt,
a data block, a tool's output). That makes it a *gullible* model on purpose: the injection
tests use it to prove that the mesh, not the model, enforces allow lists and approvals.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

from mesh.llm.types import Base, Delta, Reply, Request, StreamEvent, Text, ToolCall, ToolOutput, Usage

_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_CALL = re.compile(r"call\s+([A-Za-z_][\w.-]*)\((\{.*?\})?\)", re.DOTALL)


def _extract(prompt: str) -> str:
    bullets = [line[2:].strip() for line in prompt.splitlines() if line.startswith("- ")]
    if bullets:
        return " ".join(b if b.endswith((".", "!", "?")) else b + "." for b in bullets)
    paragraphs = [p.strip() for p in prompt.split("\n\n") if p.strip()]
    last = " ".join((paragraphs[-1] if paragraphs else "").split())
    return _SENTENCE.split(last, maxsplit=1)[0]


def _instructions(request: Request) -> list[tuple[str, dict[str, object]]]:
    found: list[tuple[str, dict[str, object]]] = []
    for turn in request.messages:
        for block in turn.content:
            text = (
                block.text
                if isinstance(block, Text)
                else block.content
                if isinstance(block, ToolOutput)
                else ""
            )
            for m in _CALL.finditer(text):
                try:
                    args = json.loads(m.group(2) or "{}")
                except json.JSONDecodeError:
                    args = {}
                found.append((m.group(1), args if isinstance(args, dict) else {}))
    return found


def _tokens(text: str) -> int:
    return max(1, len(text.split()))


class OfflineLLM(Base):
    name = "offline"
    system = "offline"
    model = "offline"

    async def chat(self, request: Request) -> Reply:
        prompt_text = "\n".join(
            b.text if isinstance(b, Text) else b.content if isinstance(b, ToolOutput) else ""
            for t in request.messages
            for b in t.content
        )
        usage_in = _tokens(request.system) + _tokens(prompt_text)
        made = sum(1 for t in request.messages for b in t.content if isinstance(b, ToolCall))
        wanted = _instructions(request)
        if request.tools and made < len(wanted):
            name, args = wanted[made]
            call = ToolCall(id=f"call_{made + 1}", name=name, input=args)
            return Reply(
                content=[call],
                stop_reason="tool_use",
                usage=Usage(usage_in, 8),
                model=self.model,
                provider=self.name,
            )
        first = next((t for t in request.messages if t.role == "user"), None)
        text = _extract(first.text if first else "")
        outputs = [
            lines[0]
            for t in request.messages
            for b in t.content
            if isinstance(b, ToolOutput) and not b.is_error
            for lines in [[x for x in b.content.splitlines() if x.strip() and not x.startswith("<")]]
            if lines
        ]
        if outputs:
            text = " ".join([text, *(o if o.endswith((".", "!", "?")) else o + "." for o in outputs)]).strip()
        text = text[: max(16, request.max_tokens * 4)]
        return Reply(
            content=[Text(text)], usage=Usage(usage_in, _tokens(text)), model=self.model, provider=self.name
        )

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        reply = await self.chat(request)
        for word in re.findall(r"\S+\s*", reply.text):
            yield Delta(word)
        yield reply
