"""Streaming a model's answer over the mesh.

While the model generates, each piece of text is published as a live-only ``llm.chunk`` in
the conversation (``mesh.<conv>.live.llm.chunk``, numbered from 0, core NATS: never stored),
so `mesh tap` shows the answer growing; then one ``llm.final`` event carries the whole text,
the model and the token counts. That event is stored in ``MESH_EVENTS``: a consumer that
joins late reads it from there (`final_answer`) and needs none of the chunks, which would
otherwise be most of what the stream keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mesh.llm.types import Delta, Reply, Request, Turn
from mesh.transport.streams import EVENTS
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.codec import default_codec
from mesh.wire.errors import RequestError
from mesh.wire.messages import Message, message

if TYPE_CHECKING:
    from mesh.agent.context import Context


@message("llm.chunk")
class LLMChunk(Message, frozen=True):
    """A piece of a streamed answer; ``seq`` counts from 0 within one ``stream``."""

    stream: str
    seq: int
    text: str
    agent: str = ""


@message("llm.final")
class LLMFinal(Message, frozen=True):
    """The whole streamed answer, published after its last chunk."""

    stream: str
    text: str
    chunks: int
    agent: str = ""
    model: str = ""
    provider: str = ""
    input_tokens: int = 0
    output_tokens: int = 0


async def stream_answer(ctx: Context, request: Request) -> Reply:
    """Run `request` on ``ctx.llm`` streaming, publishing chunks and then the final text."""
    stream_id = ctx.next_id()
    seq = 0
    final: Reply | None = None
    async for event in ctx.llm.stream(request):
        if isinstance(event, Delta):
            if event.text:
                chunk = LLMChunk(stream=stream_id, seq=seq, text=event.text, agent=ctx.agent)
                await ctx.emit(subjects.Address.live(ctx.conversation_id, "llm.chunk"), chunk)
                seq += 1
        else:
            final = event
    if final is None:
        raise RuntimeError(f"{ctx.llm.name} ended its stream without a final reply")
    await ctx.publish(
        LLMFinal(
            stream=stream_id,
            text=final.text,
            chunks=seq,
            agent=ctx.agent,
            model=final.model,
            provider=final.provider,
            input_tokens=final.usage.input_tokens,
            output_tokens=final.usage.output_tokens,
        )
    )
    return final


async def stream_text(ctx: Context, *, system: str, prompt: str, max_tokens: int = 512) -> str:
    reply = await stream_answer(
        ctx, Request(system=system, messages=[Turn.user(prompt)], max_tokens=max_tokens)
    )
    return reply.text


async def final_answer(transport: Any, conversation: str) -> LLMFinal | None:
    """The last streamed answer of a conversation, read from the event store (for a
    consumer that was not listening while it streamed). None if there is none."""
    subject = subjects.Address.event(conversation, "llm.final").subject
    try:
        raw = await transport.stored_last(EVENTS, subject)
    except TimeoutError:
        raise RequestError(
            f"no answer reading {subject} from {EVENTS}: the server may not let this identity "
            f"read stored events (agents may not; the roles may)"
        ) from None
    if raw is None:
        return None
    headers = raw.headers or {}
    return default_codec.decode(raw.data, LLMFinal, headers.get(h.CONTENT_TYPE, "application/json"))
