"""Working memory: a conversation's recent turns within a token budget.

Turns are stored as memories of kind ``turn`` in the reserved namespace ``_working`` (so
they persist and are scoped to the tenant like everything else). When the turns pass the
budget, the oldest are folded into the conversation's summary through the LLM-provider
interface (the offline default works) and deleted, until the rest fit in half the budget.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from mesh.llm import LLM
from mesh.memory.backend import StoredPoint, Where
from mesh.memory.store import NEVER, WORKING, MemoryStore, Origin, point_id, refuse

MAX_TURNS = 10_000
_ROLE_CHARS = 32


def tokens(text: str) -> int:
    """A model-independent estimate: about four characters a token."""
    return max(1, math.ceil(len(text) / 4))


@dataclass(slots=True)
class Window:
    conversation: str
    summary: str = ""
    compressed: int = 0
    turns: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return (tokens(self.summary) if self.summary else 0) + sum(tokens(t["text"]) for t in self.turns)


class WorkingMemory:
    def __init__(self, store: MemoryStore, llm: LLM, budget: int = 1024) -> None:
        self.store = store
        self.llm = llm
        self.budget = budget
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def _lock(self, tenant: str, conversation: str) -> asyncio.Lock:
        key = (tenant, conversation)
        if key not in self._locks:
            if len(self._locks) > 10_000:
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            self._locks[key] = asyncio.Lock()
        return self._locks[key]

    async def add(self, tenant: str, role: str, text: str, origin: Origin) -> Window:
        if not role or len(role) > _ROLE_CHARS:
            raise refuse("invalid", f"role must be 1-{_ROLE_CHARS} characters, got {role!r}")
        self.store.check_text(text)
        async with self._lock(tenant, origin.conversation):
            seq = self.store.clock()
            await self.store.remember(
                text,
                tenant=tenant,
                origin=origin,
                kind="turn",
                namespace=WORKING,
                extra={"role": role, "seq": seq},
                merge=False,
                pid=point_id(tenant, origin.conversation, origin.message_id, role, text),
            )
            window = await self.read(tenant, origin.conversation)
            if window.tokens > self.budget:
                window = await self._compress(tenant, window, origin)
            return window

    async def read(self, tenant: str, conversation: str) -> Window:
        self.store.check_tenant(tenant)
        scope = Where(tenant=tenant, namespace=WORKING, conversations=(conversation,))
        found = await self.store.run(self.store.backend.scroll, scope, MAX_TURNS)
        window = Window(conversation)
        for f in found:
            if f.payload.get("kind") == "summary":
                window.summary = str(f.payload.get("text", ""))
                window.compressed = int(f.payload.get("compressed", 0))
            else:
                window.turns.append({"id": f.id, **f.payload})
        window.turns.sort(key=lambda t: (float(t.get("seq", 0.0)), t["id"]))
        return window

    async def _compress(self, tenant: str, window: Window, origin: Origin) -> Window:
        keep = list(window.turns)
        folded: list[dict[str, Any]] = []
        while len(keep) > 1 and sum(tokens(t["text"]) for t in keep) > self.budget // 2:
            folded.append(keep.pop(0))
        notes = "\n".join(f"- {t.get('role', '?')}: {t['text']}" for t in folded)
        earlier = f"Summary so far: {window.summary}\n\n" if window.summary else ""
        summary = await self.llm.complete(
            system="Summarise these conversation turns for the agents that continue it. Keep names, "
            "ids and decisions.",
            prompt=f"{earlier}Turns to fold into the summary:\n{notes}",
            max_tokens=max(16, self.budget // 4),
        )
        if window.summary and summary and not summary.startswith(window.summary[:32]):
            summary = f"{window.summary} {summary}"
        summary = summary[: self.budget]  # about a quarter of the budget in tokens
        now = self.store.clock()
        payload = {
            "tenant": tenant,
            "namespace": WORKING,
            "kind": "summary",
            "text": summary,
            **origin.at(now),
            "expires_at": NEVER,
            "compressed": window.compressed + len(folded),
        }
        vector = await self.store.embed(summary or " ")
        sid = point_id(tenant, WORKING, "summary", origin.conversation)
        await self.store.run(
            self.store.backend.upsert,
            [StoredPoint(sid, vector, self.store.keywords.document(summary), payload)],
        )
        scope = Where(tenant=tenant, namespace=WORKING, conversations=(origin.conversation,), kinds=("turn",))
        await self.store.run(self.store.backend.delete, scope, [t["id"] for t in folded])
        return Window(origin.conversation, summary, window.compressed + len(folded), keep)
