"""The mesh side of the workloads: agents run with `mesh run benchmarks.mesh_agents:<name>`.

``BENCH_SUFFIX`` is appended to every agent name, so several configurations (full tracing,
sampled tracing) run side by side on one server without sharing queue groups.
The pipeline stages hand off through JetStream inboxes (the mesh default) unless
``BENCH_DURABLE=0``, which makes them use direct lines (``durable=False``).
"""

from __future__ import annotations

import asyncio
import os

import msgspec

from benchmarks.payload import Event
from mesh import Agent, Context
from mesh.join import Gathered

SUFFIX = os.environ.get("BENCH_SUFFIX", "")
DURABLE = os.environ.get("BENCH_DURABLE", "1") == "1"
WORKERS = 4


def named(base: str) -> str:
    return f"{base}{SUFFIX}"


def _marked(ev: Event, marker: str) -> Event:
    return msgspec.structs.replace(ev, text=ev.text + marker)


# ------------------------------------------------------------------ W1: one hop

responder = Agent(named("responder"), description="answers a typed request")


@responder.handler(events=False)
async def on_request(ev: Event) -> Event:
    return _marked(ev, "r")


# ------------------------------------------------------------------ W2: a pipeline


def _stage(name: str, marker: str, nxt: str | None) -> Agent:
    agent = Agent(named(name), description=f"pipeline stage {marker}")
    onward = named(nxt) if nxt else ""

    @agent.handler(events=False)
    async def on_event(ev: Event, ctx: Context) -> Event | None:
        out = _marked(ev, marker)
        if not onward:
            return out  # the last stage answers whoever the first was asked by
        await ctx.handoff(onward, out, durable=DURABLE)
        return None

    return agent


stage_a = _stage("stage-a", "A", "stage-b")
stage_b = _stage("stage-b", "B", "stage-c")
stage_c = _stage("stage-c", "C", None)


# ------------------------------------------------------------------ W3: fan-out / fan-in


def _worker(i: int) -> Agent:
    agent = Agent(named(f"worker-{i}"), description="answers one part of a task")

    @agent.handler(events=False)
    async def on_part(ev: Event) -> Event:
        return _marked(ev, str(i))

    return agent


worker_0, worker_1, worker_2, worker_3 = (_worker(i) for i in range(WORKERS))

coordinator = Agent(named("coordinator"), description="asks four workers at once and gathers")


@coordinator.handler(events=False)
async def on_task(ev: Event, ctx: Context) -> Event:
    answers = await asyncio.gather(*(ctx.request(named(f"worker-{i}"), ev, Event) for i in range(WORKERS)))
    return msgspec.structs.replace(ev, text=ev.text + "".join(a.text[-1] for a in answers))


# the same fan-out through the durable join: state in KV, answers through JetStream inboxes
join_coordinator = Agent(named("join-coordinator"), description="fans out through a durable join")
parts = join_coordinator.join("parts", Event)


@join_coordinator.handler(events=False)
async def on_join_task(ev: Event, ctx: Context) -> None:
    await ctx.fan_out(parts, [(named(f"worker-{i}"), ev) for i in range(WORKERS)])


@parts.complete
async def on_parts(g: Gathered[Event]) -> Event:
    first = g.results[0]
    return msgspec.structs.replace(first, text=first.text[:-1] + "".join(e.text[-1] for e in g.results))
