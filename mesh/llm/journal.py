"""The journal: what a handler's model calls answered and its tools returned, kept so that
a message delivered again (its process was killed mid-handler, or the handler raised and is
retried, on this replica or another) does not pay for the same model call twice, nor run
the same tool twice.

Within one handling of a message by an agent, the model calls are numbered 0, 1, 2, ... in
the order they are made, and the tool runs likewise on a counter of their own. Each is
recorded in the ``MESH_JOURNAL`` bucket under ``<agent>.<message id key>.llm.<n>`` (or
``.tool.<n>``), with a digest of what was asked, before its answer is handed back. When the
message comes again, a call whose number is recorded and asks the same thing gets the
recorded answer; the calls past those run live and are recorded in turn. A journal that
cannot be read or written costs the saving, never the handler: the call is made live.

Two counters, not one: a tool call that is not journaled (an approved call, which its
approval keeps once already) or one that a handler makes only sometimes cannot shift the
numbers of the model calls, and a replay reads the model's answers as one sequence.

`Journaled` wraps the model (`ctx.llm` is wrapped by the runtime), `run_tool` a tool run,
and `Journal.scope` is the middleware that opens the journal of each handling.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import structlog

from mesh.llm.tools import ToolError, ToolFailed, ToolInputInvalid, ToolNotAllowed, ToolTimeout, UnknownTool
from mesh.llm.types import LLM, Base, Delta, Reply, Request, StreamEvent
from mesh.runtime.audit import digest
from mesh.transport.streams import id_key

if TYPE_CHECKING:
    from mesh.llm.metering import Metering
    from mesh.llm.tools import Tool
    from mesh.middleware.base import Call
    from mesh.transport.base import Transport
    from mesh.transport.state import StateStore
    from mesh.transport.streams import BucketSpec
    from mesh.wire.settings import Settings

Kind = Literal["llm", "tool"]
log = structlog.get_logger("mesh.journal")


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True, tag="llm"):
    """A model call: the digest of its request and the model's reply."""

    asked: str
    reply: Reply


class ToolEntry(msgspec.Struct, frozen=True, kw_only=True, tag="tool"):
    """A tool run: the digest of the tool and its arguments, and what it returned (or, with
    ``error_kind`` set, the reason it failed)."""

    asked: str
    tool: str
    output: str
    error_kind: str = ""


Entry = ModelEntry | ToolEntry
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Entry).decode
_ERRORS: dict[str, type[ToolError]] = {
    e.kind: e for e in (UnknownTool, ToolNotAllowed, ToolInputInvalid, ToolTimeout, ToolFailed)
}


def journal_key(agent: str, message_id: str, kind: Kind, index: int) -> str:
    """Where call `index` of `kind` of one handling is kept: under the agent's own keys
    (only it may read or write them, mesh.transport.auth)."""
    return f"{agent}.{id_key(message_id)}.{kind}.{index}"


@dataclass(slots=True)
class Handling:
    """The journal of one handling of one message by one agent: where its calls are kept,
    and how many of each kind it has made so far."""

    store: StateStore
    agent: str
    message_id: str
    made: dict[str, int] = field(default_factory=lambda: {"llm": 0, "tool": 0})

    def next_key(self, kind: Kind) -> str:
        index = self.made[kind]
        self.made[kind] = index + 1
        return journal_key(self.agent, self.message_id, kind, index)

    async def recall(self, key: str, asked: str) -> Entry | None:
        """The entry kept under `key` if it answers the same question; None otherwise, and
        when the journal cannot be read (the call is then made live)."""
        try:
            got = await self.store.get(key)
        except Exception as exc:
            log.warning("journal not readable: calling live", agent=self.agent, key=key, error=repr(exc))
            return None
        if got is None:
            return None
        try:
            entry = _decode(got[0])
        except msgspec.DecodeError as exc:
            log.warning("journal entry unreadable: calling live", agent=self.agent, key=key, error=str(exc))
            return None
        if entry.asked != asked:  # the handler asks something else this time
            log.warning("journal entry is for another call: calling live", agent=self.agent, key=key)
            return None
        return entry

    async def record(self, key: str, entry: Entry) -> None:
        """Keep `entry`, waiting until the bucket has it: a process killed right after the
        call returns must find it on the next delivery. A failure is logged, not raised."""
        try:
            await self.store.put(key, _encode(entry))
        except Exception as exc:
            log.warning("journal not writable: call not recorded", agent=self.agent, key=key, error=repr(exc))


_current: contextvars.ContextVar[Handling | None] = contextvars.ContextVar("mesh_journal", default=None)


class Journal:
    """One agent's journal in this process: the bucket it records in (None until the
    runtime has it, or when the bucket cannot be had: then nothing is journaled)."""

    def __init__(self, agent: str, store: StateStore | None = None) -> None:
        self.agent = agent
        self.store = store

    async def open(self, transport: Transport, spec: BucketSpec, settings: Settings) -> None:
        """Bind the bucket. Without it (a mesh set up before there was a journal, where an
        agent may not create buckets) the agent runs, paying again on a redelivery, and says so."""
        try:
            self.store = await transport.state(spec, settings)
        except Exception as exc:
            log.warning(
                "no journal bucket: model calls and tools run again when a message is redelivered "
                "(`mesh up` or `mesh declare`, as the operator, creates it)",
                agent=self.agent,
                bucket=spec.name,
                error=repr(exc),
            )

    def scope(self, call_next: Call) -> Call:
        """Middleware: each handling starts its own journal, numbered from 0, keyed by the
        handler's idempotency key (agent and message id)."""

        async def call(ctx: Any, msg: Any) -> Any:
            if self.store is None:
                return await call_next(ctx, msg)
            token = _current.set(Handling(self.store, ctx.agent, ctx.message_id))
            try:
                return await call_next(ctx, msg)
            finally:
                _current.reset(token)

        return call


class Journaled(Base):
    """A model whose calls are journaled within a handling (outside one, calls pass through).
    A recorded reply is returned without calling the model; streamed, it comes back as one
    delta and the reply. With `metering` (the inner model's, a `Router`'s), a replayed call is
    counted as ``replayed``, without tokens or cost; it is never counted as a paid call."""

    def __init__(self, inner: LLM, metering: Metering | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.metering = metering

    async def chat(self, request: Request) -> Reply:
        handling = _current.get()
        if handling is None:
            return await self.inner.chat(request)
        key, asked = handling.next_key("llm"), digest(request)
        entry = await handling.recall(key, asked)
        if isinstance(entry, ModelEntry):
            self._replayed(entry.reply)
            return entry.reply
        reply = await self.inner.chat(request)
        await handling.record(key, ModelEntry(asked=asked, reply=reply))
        return reply

    async def stream(self, request: Request) -> AsyncIterator[StreamEvent]:
        handling = _current.get()
        if handling is None:
            async for event in self.inner.stream(request):
                yield event
            return
        key, asked = handling.next_key("llm"), digest(request)
        entry = await handling.recall(key, asked)
        if isinstance(entry, ModelEntry):
            self._replayed(entry.reply)
            if entry.reply.text:
                yield Delta(entry.reply.text)
            yield entry.reply
            return
        async for event in self.inner.stream(request):
            if isinstance(event, Reply):
                await handling.record(key, ModelEntry(asked=asked, reply=event))
            yield event

    def _replayed(self, reply: Reply) -> None:
        if self.metering is not None:
            self.metering.replayed(reply.provider or self.inner.name, reply.model)


def journaled(model: LLM) -> Journaled:
    """`model` journaled, metered where it meters its calls (a `Router`'s ledger)."""
    if isinstance(model, Journaled):
        return model
    return Journaled(model, getattr(model, "metering", None))


async def run_tool(tool: Tool, args: dict[str, Any], default_timeout: float) -> str:
    """`tool.run`, journaled within a handling: a run recorded for this message returns what
    it returned (or raises the error it raised) without running the tool again."""
    handling = _current.get()
    if handling is None:
        return await tool.run(args, default_timeout)
    key, asked = handling.next_key("tool"), digest({"tool": tool.name, "input": args})
    entry = await handling.recall(key, asked)
    if isinstance(entry, ToolEntry):
        if entry.error_kind:
            raise _ERRORS.get(entry.error_kind, ToolFailed)(tool.name, entry.output)
        return entry.output
    try:
        output = await tool.run(args, default_timeout)
    except ToolError as exc:
        await handling.record(
            key, ToolEntry(asked=asked, tool=tool.name, output=exc.reason, error_kind=exc.kind)
        )
        raise
    await handling.record(key, ToolEntry(asked=asked, tool=tool.name, output=output))
    return output


@dataclass(frozen=True, slots=True)
class Recorded:
    """What one handling of a message recorded, each kind in call order."""

    model: list[ModelEntry]
    tools: list[ToolEntry]


async def recorded(store: StateStore, agent: str, message_id: str, *, limit: int = 10_000) -> Recorded:
    """The journal of `agent`'s handling of `message_id`: its model replies and tool results
    in call order, read key by key up to the first missing one (for a replay of the agent's
    recorded model responses; it reads by key, so an agent may read its own)."""
    found: dict[Kind, list[Any]] = {"llm": [], "tool": []}
    for kind, out in found.items():
        for index in range(limit):
            got = await store.get(journal_key(agent, message_id, kind, index))
            if got is None:
                break
            out.append(_decode(got[0]))
    return Recorded(model=found["llm"], tools=found["tool"])
