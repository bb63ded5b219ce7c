"""The load generator of one workload on one system, as its own process.

    python -m benchmarks.driver <raw|mesh> <hop|pipeline|fanout|durable> --url ... [--suffix S]

It reads one JSON command per line on stdin and answers each with one JSON line on stdout:

- ``{"cmd": "ready", "timeout": 60}``: repeat one unit of work until it succeeds;
- ``{"cmd": "serial", "n": 2000}``: n units one after another;
- ``{"cmd": "concurrent", "n": 10000, "inflight": 16}``: n units, at most `inflight` at once;
- ``{"cmd": "quit"}``.

A unit of work is one request and its answer (hop, fanout) or one event through the
pipeline and back (pipeline, durable). Results: n, seconds, rate, p50/p99 latency in µs and
errors.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats
from nats.nuid import NUID

from benchmarks import raw_services
from benchmarks.payload import Event, RawEvent, event, raw_event

Call = Callable[[int], Awaitable[None]]
TIMEOUT = 10.0

_nuid = NUID()


def _new_id() -> str:
    return _nuid.next().decode()


class Replies:
    """Futures of units in flight, resolved by the id of the answer that comes back."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[None]] = {}

    def expect(self, n: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting[n] = fut
        return fut

    def arrived(self, n: int) -> None:
        fut = self.waiting.pop(n, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait(self, n: int, fut: asyncio.Future[None]) -> None:
        try:
            await asyncio.wait_for(fut, TIMEOUT)
        finally:
            self.waiting.pop(n, None)


async def raw_calls(workload: str, url: str, suffix: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    nc = await nats.connect(url, name=f"raw-driver-{workload}")
    dec = msgspec.json.Decoder(RawEvent)
    enc = msgspec.json.Encoder()
    s = raw_services.subject

    if workload in ("hop", "fanout", "join"):  # the durable join's floor is the same fan-out
        target = s(suffix, "responder" if workload == "hop" else "coordinator")

        async def request(n: int) -> None:
            answer = await nc.request(target, enc.encode(raw_event(n, _new_id())), timeout=TIMEOUT)
            dec.decode(answer.data)

        return request, nc.close

    replies = Replies()
    reply_subject = f"raw{suffix}.reply.{_new_id()}"

    async def on_reply(msg: Any) -> None:
        replies.arrived(dec.decode(msg.data).id)

    await nc.subscribe(reply_subject, cb=on_reply)
    if workload == "pipeline":
        first = s(suffix, "stage-a")

        async def through(n: int) -> None:
            fut = replies.expect(n)
            await nc.publish(first, enc.encode(raw_event(n, _new_id())), reply=reply_subject)
            await replies.wait(n, fut)

        return through, nc.close

    js = nc.jetstream()
    first = s(suffix, "js.stage-a")
    headers = {raw_services.REPLY_HEADER: reply_subject}

    async def stored(n: int) -> None:
        fut = replies.expect(n)
        await js.publish(first, enc.encode(raw_event(n, _new_id())), headers=headers)
        await replies.wait(n, fut)

    return stored, nc.close


async def mesh_calls(workload: str, url: str, suffix: str) -> tuple[Call, Callable[[], Awaitable[None]]]:
    from mesh.client import MeshClient
    from mesh.codec import default_codec
    from mesh.logs import configure_logging
    from mesh.settings import Settings
    from mesh.subjects import Address
    from mesh.tracing import configure_tracing

    settings = Settings.load()
    configure_logging(settings)
    shutdown_tracing = configure_tracing(settings, "bench-driver")
    client = await MeshClient.connect(settings, "bench-driver", url=url)

    async def close() -> None:
        await client.close()
        shutdown_tracing()

    if workload in ("hop", "fanout"):
        agent = f"{'responder' if workload == 'hop' else 'coordinator'}{suffix}"

        async def request(n: int) -> None:
            conv = _new_id()
            await client.request(agent, event(n, conv), Event, timeout=TIMEOUT, conversation=conv)

        return request, close

    replies = Replies()
    token = _new_id()
    durable = workload in ("durable", "join")

    async def on_reply(msg: Any) -> None:
        replies.arrived(default_codec.decode(msg.data, Event).id)

    await client.transport.subscribe(f"mesh.*.reply.{token}", on_reply)
    await client.transport.flush()
    first = f"{'join-coordinator' if workload == 'join' else 'stage-a'}{suffix}"

    async def through(n: int) -> None:
        conv = _new_id()
        fut = replies.expect(n)
        await client.send(
            first,
            event(n, conv),
            conversation=conv,
            durable=durable,
            reply_to=Address.reply(conv, token).subject,
        )
        await replies.wait(n, fut)

    return through, close


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    i = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1000.0


async def run_units(call: Call, ids: itertools.count[int], n: int, inflight: int) -> dict[str, Any]:
    latencies: list[int] = []
    errors = 0
    todo = iter(range(n))

    async def lane() -> None:
        nonlocal errors
        for _ in todo:
            started = time.perf_counter_ns()
            try:
                await call(next(ids))
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter_ns() - started)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(inflight)))
    seconds = time.perf_counter() - started
    latencies.sort()
    return {
        "n": n,
        "seconds": seconds,
        "rate": len(latencies) / seconds if seconds else 0.0,
        "p50_us": _percentile(latencies, 0.50),
        "p99_us": _percentile(latencies, 0.99),
        "errors": errors,
    }


async def ready(call: Call, ids: itertools.count[int], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(call(next(ids)), 3.0)
            return {"ready": True}
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.2)
    return {"ready": False, "error": last}


async def main_async(system: str, workload: str, url: str, suffix: str) -> None:
    make = raw_calls if system == "raw" else mesh_calls
    call, close = await make(workload, url, suffix)
    ids = itertools.count(1)
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            kind = cmd["cmd"]
            if kind == "quit":
                return
            if kind == "ready":
                out = await ready(call, ids, float(cmd.get("timeout", 60)))
            elif kind == "serial":
                out = await run_units(call, ids, int(cmd["n"]), 1)
            elif kind == "concurrent":
                out = await run_units(call, ids, int(cmd["n"]), int(cmd["inflight"]))
            else:
                out = {"error": f"unknown command {kind!r}"}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    finally:
        await close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=["raw", "mesh"])
    parser.add_argument("workload", choices=["hop", "pipeline", "fanout", "durable", "join"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    asyncio.run(main_async(args.system, args.workload, args.url, args.suffix))


if __name__ == "__main__":
    main()
