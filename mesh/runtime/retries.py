"""Retries of stored messages: backoff, the failure history, and dead letters after the
last delivery (including deliveries that never came back because the process died)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Collection, Mapping
from typing import Any

import structlog

from mesh.runtime.deadletter import dead_letter
from mesh.transport import streams
from mesh.transport.base import Transport
from mesh.transport.state import StateStore
from mesh.wire import envelope as h
from mesh.wire.errors import DeliveryError
from mesh.wire.settings import Settings

log = structlog.get_logger("mesh.runtime.retries")

MAX_HISTORY = 20
ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


def backoff(settings: Settings, delivery: int) -> float:
    """Delay before delivery ``delivery + 1``: doubling from MESH_RETRY_BACKOFF, capped,
    with ±20% jitter so replicas retrying the same burst spread out."""
    base = min(settings.retry_backoff_max, settings.retry_backoff * 2 ** max(0, delivery - 1))
    return float(base * random.uniform(0.8, 1.2))


class Failures:
    """The failure history of messages, kept in the state bucket until they succeed or are
    dead-lettered, so the dead letter says what happened on every delivery, on any replica."""

    def __init__(self, state: StateStore, agent: str, instance: str) -> None:
        self.state = state
        self.agent = agent
        self.instance = instance

    async def record(self, message_id: str, delivery: int, error: str) -> list[dict[str, Any]]:
        key = streams.failures_key(self.agent, message_id)
        got = await self.state.get(key)
        history: list[dict[str, Any]] = json.loads(got[0]) if got else []
        history.append(
            {"n": delivery, "at_ns": time.time_ns(), "instance": self.instance, "error": error[:500]}
        )
        history = history[-MAX_HISTORY:]
        await self.state.put(key, json.dumps(history).encode())
        return history

    async def history(self, message_id: str) -> list[dict[str, Any]]:
        got = await self.state.get(streams.failures_key(self.agent, message_id))
        return json.loads(got[0]) if got else []

    async def forget(self, message_id: str) -> None:
        await self.state.delete(streams.failures_key(self.agent, message_id))


async def keep_alive(working: Mapping[Any, Any], ack_wait: float) -> None:
    """Tell the server, every third of MESH_ACK_WAIT, that the stored messages in `working`
    (running or waiting for a slot) are still being worked on, so it does not redeliver them."""
    every = max(0.2, ack_wait / 3)
    while True:
        await asyncio.sleep(every)
        for msg in list(working.values()):
            with contextlib.suppress(Exception):
                await msg.in_progress()


def history_headers(history: list[dict[str, Any]], deliveries: int) -> dict[str, str]:
    text = json.dumps(history, separators=(",", ":"))
    while len(text) > 16_000 and len(history) > 1:
        history = history[1:]
        text = json.dumps(history, separators=(",", ":"))
    return {h.DLQ_DELIVERIES: str(deliveries), h.DLQ_HISTORY: text}


async def on_max_deliveries(
    transport: Transport,
    failures: Failures,
    agent: str,
    advisory: bytes,
    *,
    secret_headers: Collection[str] = (),
) -> None:
    """The server gave up on a message (its last delivery was never acknowledged: the
    handler crashed or hung every time). Copy it to the dead letters, then drop it from
    the agent's work queue."""
    try:
        event = json.loads(advisory)
        stream, seq, deliveries = event["stream"], int(event["stream_seq"]), int(event.get("deliveries", 0))
    except (ValueError, KeyError, TypeError):
        log.warning("unreadable max-deliveries advisory", data=advisory[:500])
        return
    try:
        stored = await transport.stored(stream, seq)
    except Exception as exc:  # acknowledged late, or removed meanwhile: nothing to keep
        log.info("message of a max-deliveries advisory is gone", stream=stream, seq=seq, error=str(exc))
        return
    try:
        message_id = h.message_id(dict(stored.headers or {}), f"{stream}-{seq}")
    except DeliveryError:  # an id over the limit: its failures were never recorded under it
        message_id = f"{stream}-{seq}"
    history = await failures.history(message_id)
    reason = (
        f"delivered {deliveries} times without an acknowledgement: the handler crashed, hung "
        f"past MESH_ACK_WAIT or its process was killed each time"
    )
    if await dead_letter(
        transport,
        agent=agent,
        msg=stored,
        kind="max_deliveries",
        reason=reason,
        extra=history_headers(history, deliveries),
        secret_headers=secret_headers,
    ):
        await failures.forget(message_id)
        if stream == streams.INBOX:
            try:
                await transport.delete_stored(stream, seq)
            except Exception as exc:
                log.warning("could not drop a dead-lettered inbox message", seq=seq, error=str(exc))
