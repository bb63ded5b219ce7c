"""The memory service as its own process: concurrent writers in several agent processes,
and acknowledged writes surviving a kill -9 of the service."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import SAMPLES
from memory_facts import FACTS, distractors
from sample_agents.memo import Note, Noted

from mesh.memory.client import Memory
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import Recorder, spawn_agent
from mesh.wire.codec import default_codec
from mesh.wire.envelope import new_id
from mesh.wire.settings import Settings

pytestmark = pytest.mark.slow

SERVICE = "mesh.services.memory:agent"
MEMO = f"{SAMPLES / 'memo.py'}:agent"


async def test_concurrent_writers_and_acknowledged_writes_survive_a_killed_service(
    settings: Settings, client: MeshClient, procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    service = spawn_agent(SERVICE, settings, log=tmp_path / "memory.log")
    procs.append(service)
    for i in range(3):
        procs.append(spawn_agent(MEMO, settings, log=tmp_path / f"memo{i}.log"))
    await wait_for_agents(client.transport, {"memory": 1, "memo": 3}, timeout=30)

    texts = [f"{token}: {fact}" for token, fact, _ in FACTS] + distractors(30, seed=11)
    conv = new_id()
    rec = await Recorder.start(client.transport, f"mesh.{conv}.evt.memtest.noted")
    for text in texts:
        await client.send("memo", Note(text=text), conversation=conv)
    msgs = await rec.wait_count(len(texts), timeout=60)
    noted = [default_codec.decode(m.data, Noted) for m in msgs]
    assert [n.error for n in noted if n.error] == []
    acknowledged = {n.text: n.id for n in noted}
    assert set(acknowledged) == set(texts)
    assert len(set(acknowledged.values())) == len(texts)  # no write lost or merged away
    writers = {n.pid for n in noted}
    assert len(writers) >= 2, f"all writes came from {writers}"

    service.kill()  # SIGKILL: no drain, no flush
    service.wait(10)
    procs.append(spawn_agent(SERVICE, settings, log=tmp_path / "memory-restarted.log"))
    await wait_for_agents(client.transport, {"memory": 1}, timeout=30)

    memory = Memory(client, settings.model_copy(update={"memory_timeout": 10.0}))
    everything = await memory.recall("the", k=100, mode="dense")
    assert {h.id for h in everything} == set(acknowledged.values())
    for token, fact, _ in FACTS:
        [top] = await memory.recall(token, k=1)
        assert top.id == acknowledged[f"{token}: {fact}"]
    print(f"\nmemory processes: {len(texts)} writes from {len(writers)} processes, all found after kill -9")
