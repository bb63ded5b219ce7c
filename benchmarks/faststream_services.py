"""FastStream on the same workloads, one service per process, written as its docs teach:

    python -m benchmarks.faststream_services <role> --url nats://... [--suffix S]

Roles: ``responder``; ``stage-a|b|c`` (a subscriber whose return value goes to the next
stage's subject through a ``@publisher``; the last stage publishes to the driver's reply
subject); ``worker-<n>`` and ``coordinator`` (four concurrent ``broker.request`` calls).
A pydantic model is the handler's parameter and return type, so FastStream decodes and
encodes every message. The broker's logger is off: by default it logs every message at INFO.

FastStream is a bench-only extra (``pip install -e '.[bench]'``); without it this module
cannot be imported and the runner skips the FastStream system with a note.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

from faststream.nats import NatsBroker
from pydantic import BaseModel

WORKERS = 4
TIMEOUT = 10.0


class FsEvent(BaseModel):
    """The payload of benchmarks/payload.py as a FastStream user would type it."""

    id: int
    conversation_id: str
    text: str
    created_ns: int


def subject(suffix: str, name: str) -> str:
    return f"fs{suffix}.{name}"


def new_broker(url: str, name: str) -> NatsBroker:
    return NatsBroker(url, name=name, logger=None)


def _marked(ev: FsEvent, marker: str) -> FsEvent:
    return ev.model_copy(update={"text": ev.text + marker})


def build(role: str, url: str, suffix: str) -> NatsBroker:
    broker = new_broker(url, f"fs-{role}")
    if role == "responder" or role.startswith("worker-"):
        marker = "r" if role == "responder" else role.rsplit("-", 1)[1]

        @broker.subscriber(subject(suffix, role))
        async def answer(ev: FsEvent) -> FsEvent:
            return _marked(ev, marker)

    elif role.startswith("stage-"):
        marker = role[-1].upper()
        onward = {"a": "stage-b", "b": "stage-c"}.get(role[-1], "reply")

        @broker.subscriber(subject(suffix, role))
        @broker.publisher(subject(suffix, onward))
        async def stage(ev: FsEvent) -> FsEvent:
            return _marked(ev, marker)

    elif role == "coordinator":

        @broker.subscriber(subject(suffix, role))
        async def coordinate(ev: FsEvent) -> FsEvent:
            answers = await asyncio.gather(
                *(broker.request(ev, subject(suffix, f"worker-{i}"), timeout=TIMEOUT) for i in range(WORKERS))
            )
            parts = [FsEvent.model_validate_json(a.body) for a in answers]
            return ev.model_copy(update={"text": ev.text + "".join(p.text[-1] for p in parts)})

    else:
        raise SystemExit(f"unknown role {role!r}")
    return broker


async def serve(role: str, url: str, suffix: str) -> None:
    broker = build(role, url, suffix)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role")
    parser.add_argument("--url", required=True)
    parser.add_argument("--suffix", default="")
    args = parser.parse_args()
    asyncio.run(serve(args.role, args.url, args.suffix))


if __name__ == "__main__":
    main()
