"""Streaming over the mesh: chunks appear on the conversation as the model generates, the
final message carries the whole text, and a consumer that joins late still gets it."""

from __future__ import annotations

import msgspec
import pytest
from mesh_user_streaming import Question, agent

from mesh import Agent
from mesh.agent.identity import provision
from mesh.llm.streaming import LLMChunk, LLMFinal, final_answer
from mesh.runtime.client import MeshClient
from mesh.testing import Recorder, running_agent
from mesh.transport.streams import EVENTS
from mesh.wire.codec import default_codec
from mesh.wire.errors import RequestError
from mesh.wire.settings import Settings


async def test_a_streamed_answer_grows_on_the_conversation(client: MeshClient, settings: Settings) -> None:
    conv = "stream-live"
    rec = await Recorder.start(client.transport, f"mesh.{conv}.*.llm.>")
    async with running_agent(agent, settings):
        await client.send(
            "streamer", Question(text="- One fact\n- Two facts\n- Three facts"), conversation=conv
        )
        msgs = await rec.wait_for(lambda ms: any(m.subject.endswith("llm.final") for m in ms))
    chunks = [default_codec.decode(m.data, LLMChunk) for m in msgs if m.subject.endswith("llm.chunk")]
    [final] = [default_codec.decode(m.data, LLMFinal) for m in msgs if m.subject.endswith("llm.final")]
    assert [c.seq for c in chunks] == list(range(len(chunks))) and len(chunks) > 3
    assert "".join(c.text for c in chunks) == final.text == "One fact. Two facts. Three facts."
    assert final.chunks == len(chunks) and final.agent == "streamer" and final.provider == "offline"
    assert {c.stream for c in chunks} == {final.stream}
    # the final message is published after the last chunk
    assert msgs[-1].subject.endswith("llm.final")
    # the chunks are live only: seen by whoever listened, never stored; the final answer is
    assert {m.subject for m in msgs} == {f"mesh.{conv}.live.llm.chunk", f"mesh.{conv}.evt.llm.final"}
    assert await client.transport.stored_last(EVENTS, f"mesh.{conv}.evt.llm.final") is not None
    assert await client.transport.stored_last(EVENTS, f"mesh.{conv}.evt.llm.chunk") is None


async def test_a_late_consumer_still_gets_the_final_answer(client: MeshClient, settings: Settings) -> None:
    conv = "stream-late"
    done = await Recorder.start(client.transport, f"mesh.{conv}.evt.llm.final")
    async with running_agent(agent, settings):
        await client.send("streamer", Question(text="Only this sentence. Not this."), conversation=conv)
        await done.wait_count(1)
    # nobody listened to the chunks; the publisher role reads the stored final message
    final = await final_answer(client.transport, conv)
    assert final is not None and final.text == "Only this sentence."
    assert msgspec.structs.asdict(final)["chunks"] == 3
    assert await final_answer(client.transport, "stream-nothing-here") is None
    # an agent may not read stored events: it is told so, not given "no answer"
    reader = await MeshClient.connect(await provision(Agent("reader"), settings), "reader")
    try:
        with pytest.raises(RequestError, match="may not let this identity read stored events"):
            await final_answer(reader.transport, conv)
    finally:
        await reader.close()
