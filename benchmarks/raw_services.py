"""The raw floor: the same services written directly on nats-py + msgspec, one per process.

    python -m benchmarks.raw_services <role> --url nats://... [--suffix S]

Roles: ``responder``; ``stage-a|b|c`` (core NATS pipeline, the reply subject travels as the
NATS reply); ``worker-<n>`` and ``coordinator`` (fan-out by four concurrent requests);
``js-stage-a|b|c`` (a JetStream pipeline: a work-queue stream, one durable pull consumer
per stage, publish with ack, explicit ack after handling). No tracing, no logging, no validation
beyond msgspec's typed decode: the least a hand-written service does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import Any

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from benchmarks.payload import RawEvent

WORKERS = 4
REPLY_HEADER = "Bench-Reply"
FETCH_BATCH = 64
_dec = msgspec.json.Decoder(RawEvent)
_enc = msgspec.json.Encoder()


def subject(suffix: str, name: str) -> str:
    return f"raw{suffix}.{name}"


def stream_name(suffix: str) -> str:
    return f"RAW_PIPE{suffix.replace('-', '_').upper()}"


def _marked(data: bytes, marker: str) -> bytes:
    ev = _dec.decode(data)
    return _enc.encode(msgspec.structs.replace(ev, text=ev.text + marker))


async def responder(nc: Any, suffix: str) -> None:
    async def on_msg(msg: Any) -> None:
        await nc.publish(msg.reply, _marked(msg.data, "r"))

    await nc.subscribe(subject(suffix, "responder"), queue="responder", cb=on_msg)


async def stage(nc: Any, suffix: str, name: str) -> None:
    marker = name[-1].upper()
    nxt = {"a": "stage-b", "b": "stage-c"}.get(name[-1])
    onward = subject(suffix, nxt) if nxt else ""

    async def on_msg(msg: Any) -> None:
        data = _marked(msg.data, marker)
        if onward:
            await nc.publish(onward, data, reply=msg.reply)
        else:
            await nc.publish(msg.reply, data)

    await nc.subscribe(subject(suffix, name), queue=name, cb=on_msg)


async def worker(nc: Any, suffix: str, name: str) -> None:
    marker = name.rsplit("-", 1)[1]

    async def on_msg(msg: Any) -> None:
        await nc.publish(msg.reply, _marked(msg.data, marker))

    await nc.subscribe(subject(suffix, name), queue=name, cb=on_msg)


async def coordinator(nc: Any, suffix: str) -> None:
    async def handle(msg: Any) -> None:
        ev = _dec.decode(msg.data)
        body = _enc.encode(ev)
        answers = await asyncio.gather(
            *(nc.request(subject(suffix, f"worker-{i}"), body, timeout=10) for i in range(WORKERS))
        )
        parts = [_dec.decode(a.data) for a in answers]
        out = msgspec.structs.replace(ev, text=ev.text + "".join(p.text[-1] for p in parts))
        await nc.publish(msg.reply, _enc.encode(out))

    tasks: set[asyncio.Task[None]] = set()

    async def on_msg(msg: Any) -> None:  # concurrent tasks, like any service that awaits
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(subject(suffix, "coordinator"), queue="coordinator", cb=on_msg)


async def js_stage(nc: Any, suffix: str, name: str) -> asyncio.Task[None]:
    """One stage of the raw JetStream pipeline: a durable pull consumer with explicit acks;
    each fetched batch is handled concurrently, every onward publish waits for its ack, and
    a message is acked only after its onward publish was."""
    js = nc.jetstream()
    stream = stream_name(suffix)
    with contextlib.suppress(nats.js.errors.BadRequestError):  # another stage created it first
        await js.add_stream(
            StreamConfig(
                name=stream,
                subjects=[subject(suffix, "js.*")],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
            )
        )
    short = name.removeprefix("js-")
    marker = short[-1].upper()
    nxt = {"a": "js.stage-b", "b": "js.stage-c"}.get(short[-1])
    pull = await js.pull_subscribe(
        subject(suffix, f"js.{short}"),
        durable=short,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000, ack_wait=30),
    )

    async def handle(msg: Any) -> None:
        data = _marked(msg.data, marker)
        reply = (msg.headers or {}).get(REPLY_HEADER, "")
        if nxt:
            await js.publish(subject(suffix, nxt), data, headers={REPLY_HEADER: reply})
        else:
            await nc.publish(reply, data)
        await msg.ack()

    async def consume() -> None:
        while True:
            try:
                batch = await pull.fetch(FETCH_BATCH, timeout=1.0)
            except TimeoutError:  # nothing to do for a second (nats-py raises both kinds)
                continue
            await asyncio.gather(*(handle(m) for m in batch))

    return asyncio.create_task(consume())


async def serve(role: str, url: str, suffix: str) -> None:
    nc = await nats.connect(url, name=f"raw-{role}")
    stop = asyncio.Event()
    consumer: asyncio.Task[None] | None = None
    if role == "responder":
        await responder(nc, suffix)
    elif role.startswith("js-stage-"):
        consumer = await js_stage(nc, suffix, role)
    elif role.startswith("stage-"):
        await stage(nc, suffix, role)
    elif role.startswith("worker-"):
        await worker(nc, suffix, role)
    elif role == "coordinator":
        await coordinator(nc, suffix)
    else:
        raise SystemExit(f"unknown role {role!r}")
    await nc.flush()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if consumer is None:
        await stop.wait()
        await nc.drain()
        return
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait([stopped, consumer], return_when=asyncio.FIRST_COMPLETED)
    if consumer.done():  # it failed: exit with its error, so the run stops and says why
        await nc.close()
        consumer.result()
    consumer.cancel()  # mid-fetch: a drain would wait for the pull request to expire
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role")
    parser.add_argument("--url", required=True)
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    asyncio.run(serve(args.role, args.url, args.suffix))


if __name__ == "__main__":
    main()
