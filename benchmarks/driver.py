"""The load generator of one workload on one system, as its own process.

    python -m benchmarks.driver <raw|jetstream|faststream|mesh> <workload> --url ... [--suffix S]

It reads one JSON command per line on stdin and answers each with one JSON line on stdout:

- ``{"cmd": "ready", "timeout": 60}``: repeat one unit of work until it succeeds;
- ``{"cmd": "serial", "n": 2000}``: n units one after another;
- ``{"cmd": "concurrent", "n": 10000, "inflight": 16}``: n units, at most `inflight` at once;
- ``{"cmd": "stream", "n": 3000}`` (pipeline): n events sent like a user's code sends them,
  one after another, each send awaited (a durable send returns after its publish ack),
  without waiting for answers; then every answer is awaited;
- ``{"cmd": "quit"}``.

A unit of work is one request and its answer (hop, fanout, join) or one event through the
pipeline and back (pipeline). Results: n, seconds, rate, p50/p99 latency in µs and errors
(a failed send, or an answer that never came). SIGUSR1 prints where every task waits to the
driver's log (stderr), for a phase that never answers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
from nats.nuid import NUID

from benchmarks import raw_services
from benchmarks.payload import TEXT, Event, RawEvent, event, raw_event

Call = Callable[[int], Awaitable[None]]
TIMEOUT = 10.0

_nuid = NUID()


def _new_id() -> str:
    return _nuid.next().decode()


class Replies:
    """Answers awaited by the id of the event they answer; each resolves with its arrival time."""

    def __init__(self) -> None:
        self.waiting: dict[int, asyncio.Future[int]] = {}

    def expect(self, n: int) -> asyncio.Future[int]:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting[n] = fut
        return fut

    def arrived(self, n: int) -> None:
        fut = self.waiting.pop(n, None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter_ns())

    def forget(self, n: int) -> None:
        fut = self.waiting.pop(n, None)
        if fut is not None:
            fut.cancel()

    async def wait(self, n: int, fut: asyncio.Future[int]) -> None:
        try:
            await asyncio.wait_for(fut, TIMEOUT)
        finally:
            self.waiting.pop(n, None)


@dataclass
class Calls:
    """What a driver does on its system: `unit` is one unit of work awaited to its answer;
    for the pipeline, `send` sends one event and returns when the send does, and its answer
    arrives in `replies`."""

    unit: Call
    close: Callable[[], Awaitable[None]]
    send: Call | None = None
    replies: Replies | None = None


def _through(send: Call, replies: Replies) -> Call:
    async def through(n: int) -> None:
        fut = replies.expect(n)
        try:
            await send(n)
        except BaseException:
            replies.forget(n)
            raise
        await replies.wait(n, fut)

    return through


async def raw_calls(workload: str, url: str, suffix: str) -> Calls:
    nc = await nats.connect(url, name=f"raw-driver-{workload}")
    dec = msgspec.json.Decoder(RawEvent)
    enc = msgspec.json.Encoder()
    s = raw_services.subject

    if workload in ("hop", "fanout", "join"):  # the durable join's floor is the same fan-out
        target = s(suffix, "responder" if workload == "hop" else "coordinator")

        async def request(n: int) -> None:
            answer = await nc.request(target, enc.encode(raw_event(n, _new_id())), timeout=TIMEOUT)
            dec.decode(answer.data)

        return Calls(request, nc.close)

    replies = Replies()
    reply_subject = f"raw{suffix}.reply.{_new_id()}"

    async def on_reply(msg: Any) -> None:
        replies.arrived(dec.decode(msg.data).id)

    await nc.subscribe(reply_subject, cb=on_reply)
    first = s(suffix, "stage-a")

    async def send(n: int) -> None:
        await nc.publish(first, enc.encode(raw_event(n, _new_id())), reply=reply_subject)

    return Calls(_through(send, replies), nc.close, send, replies)


async def jetstream_calls(workload: str, url: str, suffix: str) -> Calls:
    if workload != "pipeline":
        raise SystemExit(f"the raw JetStream system runs the pipeline only, not {workload!r}")
    nc = await nats.connect(url, name=f"js-driver-{workload}")
    js = nc.jetstream()
    dec = msgspec.json.Decoder(RawEvent)
    enc = msgspec.json.Encoder()
    replies = Replies()
    reply_subject = f"raw{suffix}.reply.{_new_id()}"

    async def on_reply(msg: Any) -> None:
        replies.arrived(dec.decode(msg.data).id)

    await nc.subscribe(reply_subject, cb=on_reply)
    first = raw_services.subject(suffix, "js.stage-a")
    headers = {raw_services.REPLY_HEADER: reply_subject}

    async def send(n: int) -> None:  # returns once the stream has stored it
        await js.publish(first, enc.encode(raw_event(n, _new_id())), headers=headers)

    return Calls(_through(send, replies), nc.close, send, replies)


async def faststream_calls(workload: str, url: str, suffix: str) -> Calls:
    from benchmarks.faststream_services import FsEvent, new_broker, subject

    broker = new_broker(url, f"fs-driver-{workload}")

    def fs_event(n: int) -> FsEvent:
        return FsEvent(id=n, conversation_id=_new_id(), text=TEXT, created_ns=time.time_ns())

    if workload in ("hop", "fanout"):
        target = subject(suffix, "responder" if workload == "hop" else "coordinator")
        await broker.start()

        async def request(n: int) -> None:
            answer = await broker.request(fs_event(n), target, timeout=TIMEOUT)
            FsEvent.model_validate_json(answer.body)

        return Calls(request, broker.stop)
    if workload != "pipeline":
        raise SystemExit(f"the FastStream system does not run {workload!r}")

    replies = Replies()

    @broker.subscriber(subject(suffix, "reply"))
    async def on_reply(ev: FsEvent) -> None:
        replies.arrived(ev.id)

    await broker.start()
    first = subject(suffix, "stage-a")

    async def send(n: int) -> None:
        await broker.publish(fs_event(n), first)

    return Calls(_through(send, replies), broker.stop, send, replies)


async def mesh_calls(workload: str, url: str, suffix: str) -> Calls:
    from mesh.observability.logs import configure_logging
    from mesh.observability.tracing import configure_tracing
    from mesh.runtime.client import MeshClient
    from mesh.wire.codec import default_codec
    from mesh.wire.settings import Settings
    from mesh.wire.subjects import Address

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

        return Calls(request, close)

    replies = Replies()
    token = _new_id()
    durable = os.environ.get("BENCH_DURABLE", "1") == "1"

    async def on_reply(msg: Any) -> None:
        replies.arrived(default_codec.decode(msg.data, Event).id)

    await client.transport.subscribe(f"mesh.*.reply.{token}", on_reply)
    await client.transport.flush()
    first = f"{'join-coordinator' if workload == 'join' else 'stage-a'}{suffix}"

    async def send(n: int) -> None:
        conv = _new_id()
        await client.send(
            first,
            event(n, conv),
            conversation=conv,
            durable=durable,
            reply_to=Address.reply(conv, token).subject,
        )

    return Calls(_through(send, replies), close, send, replies)


MAKERS: dict[str, Callable[[str, str, str], Awaitable[Calls]]] = {
    "raw": raw_calls,
    "jetstream": jetstream_calls,
    "faststream": faststream_calls,
    "mesh": mesh_calls,
}


def _percentile(sorted_ns: list[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    i = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[i] / 1000.0


def _summary(n: int, seconds: float, latencies: list[int], errors: int) -> dict[str, Any]:
    latencies.sort()
    return {
        "n": n,
        "seconds": seconds,
        "rate": len(latencies) / seconds if seconds else 0.0,
        "p50_us": _percentile(latencies, 0.50),
        "p99_us": _percentile(latencies, 0.99),
        "errors": errors,
    }


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
    return _summary(n, time.perf_counter() - started, latencies, errors)


async def run_stream(calls: Calls, ids: itertools.count[int], n: int) -> dict[str, Any]:
    """Send n events one after another, awaiting each send and nothing else, then wait for
    every answer (at most TIMEOUT + n/100 s after the last send). The rate is answers over
    the time from the first send to the last answer; latency is send to answer."""
    if calls.send is None or calls.replies is None:
        return {"error": "this workload has no one-way send"}
    sent: list[tuple[int, asyncio.Future[int]]] = []
    errors = 0
    started = time.perf_counter_ns()
    for _ in range(n):
        i = next(ids)
        fut = calls.replies.expect(i)
        at = time.perf_counter_ns()
        try:
            await calls.send(i)
        except Exception:
            errors += 1
            calls.replies.forget(i)
            continue
        sent.append((at, fut))
    if sent:
        await asyncio.wait([f for _, f in sent], timeout=TIMEOUT + n / 100)
    latencies = [f.result() - at for at, f in sent if f.done() and not f.cancelled()]
    last = max((f.result() for _, f in sent if f.done() and not f.cancelled()), default=started)
    for _, fut in sent:
        if not fut.done():
            errors += 1
            fut.cancel()
    calls.replies.waiting.clear()
    return _summary(n, (last - started) / 1e9, latencies, errors)


async def ready(call: Call, ids: itertools.count[int], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(call(next(ids)), 1.0)
            return {"ready": True}
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.2)
    return {"ready": False, "error": last}


def _dump_tasks() -> None:
    """SIGUSR1: where every task waits, to the driver's log (a phase that never answers)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


async def main_async(system: str, workload: str, url: str, suffix: str) -> None:
    calls = await MAKERS[system](workload, url, suffix)
    ids = itertools.count(1)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
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
                out = await ready(calls.unit, ids, float(cmd.get("timeout", 60)))
            elif kind == "serial":
                out = await run_units(calls.unit, ids, int(cmd["n"]), 1)
            elif kind == "concurrent":
                out = await run_units(calls.unit, ids, int(cmd["n"]), int(cmd["inflight"]))
            elif kind == "stream":
                out = await run_stream(calls, ids, int(cmd["n"]))
            else:
                out = {"error": f"unknown command {kind!r}"}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    finally:
        await calls.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("system", choices=list(MAKERS))
    parser.add_argument("workload", choices=["hop", "pipeline", "fanout", "join"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    asyncio.run(main_async(args.system, args.workload, args.url, args.suffix))


if __name__ == "__main__":
    main()
