"""The rungs of the delivery ladder, each alone: no server, a delivery that records what it
was told, state in memory. (The same behaviour end to end, against a real nats-server, is in
test_runtime, test_poison, test_faults and test_sweep.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from mesh.runtime.discovery import Stats
from mesh.runtime.ladder import (
    Accept,
    Count,
    GiveUp,
    Guard,
    HandlerFailed,
    Run,
    Settle,
    SettleDirect,
    TimeLimit,
    Work,
)
from mesh.runtime.retries import Failures
from mesh.transport import streams
from mesh.transport.delivery import Later
from mesh.transport.state import MemoryState
from mesh.wire import envelope as h
from mesh.wire.errors import DeliveryError, Reject, ServerUnavailable
from mesh.wire.settings import Settings

SETTINGS = Settings.load(environ={}, max_deliver=3, retry_backoff=0.5, retry_backoff_max=4.0)


class Told:
    """A stored delivery that records what the ladder told the stream."""

    stored = True
    reply = ""

    def __init__(
        self, attempt: int = 1, headers: dict[str, str] | None = None, type_name: str = "t.ping"
    ) -> None:
        self.subject = "mesh.c1.agent.a"
        self.data = b"{}"
        self.headers = {h.TYPE: type_name, h.ID: "m1", **(headers or {})}
        self.attempt = attempt
        self.origin = "MESH_INBOX-7"
        self.said: list[tuple[str, float | None]] = []

    async def ack(self) -> None:
        self.said.append(("ack", None))

    async def nak(self, delay: float | None = None) -> None:
        self.said.append(("nak", delay))

    async def in_progress(self) -> None:
        self.said.append(("wpi", None))


def work(d: Told) -> Work:
    return Work(d, env=h.open_envelope(d.subject, d.data, d.headers, d.reply, d.origin))


class Letters:
    def __init__(self, ok: bool = True) -> None:
        self.ok = ok
        self.sent: list[tuple[str, str, dict[str, str] | None]] = []

    async def __call__(self, d: Any, kind: str, reason: str, extra: dict[str, str] | None) -> bool:
        self.sent.append((kind, reason, extra))
        return self.ok


def settle(
    below: Any, letters: Letters | None = None
) -> tuple[Settle, Stats, MemoryState, Failures, Letters]:
    stats, processed, letters = Stats(), MemoryState(), letters or Letters()
    failures = Failures(MemoryState(), "a", "i1")
    rung = Settle(
        below,
        agent="a",
        settings=SETTINGS,
        stats=stats,
        processed=processed,
        failures=failures,
        dead_letter=letters,
        log=_Log(),
    )
    return rung, stats, processed, failures, letters


class _Log:
    def warning(self, *a: Any, **k: Any) -> None: ...
    def debug(self, *a: Any, **k: Any) -> None: ...
    def exception(self, *a: Any, **k: Any) -> None: ...


def returning(value: Any) -> Any:
    async def below(w: Work) -> Any:
        if isinstance(value, BaseException):
            raise value
        return value

    return below


async def test_handled_work_is_marked_processed_then_acknowledged() -> None:
    rung, stats, processed, _, letters = settle(returning(None))
    d = Told()
    await rung(work(d))
    assert d.said == [("ack", None)]
    assert await processed.exists(streams.processed_key("a", "m1"))
    assert (stats.handled, letters.sent) == (1, [])


class Unstorable:
    """An outbox whose sends the stream never acknowledges."""

    unstored = False
    closed = False

    async def flush(self) -> None:
        raise ServerUnavailable("'mesh.c1.agent.b' was not stored after 3 attempt(s)")

    def close(self) -> None:
        self.closed = True


class Sending:
    def __init__(self) -> None:
        self.outbox = Unstorable()

    async def flush(self) -> None:
        await self.outbox.flush()


async def test_a_run_whose_sends_cannot_be_stored_fails_and_is_retried_unacknowledged() -> None:
    async def handler(*args: Any) -> None:
        return None

    rung, stats, processed, _, _ = settle(TimeLimit(Run(handler), 5))
    d = Told()
    w = work(d)
    w.ctx = ctx = Sending()  # type: ignore[assignment]
    await rung(w)
    [(what, _)] = d.said
    assert what == "nak" and (stats.handled, stats.retried) == (0, 1)
    assert "was not stored" in stats.last_error and ctx.outbox.closed
    assert not await processed.exists(streams.processed_key("a", "m1"))


async def test_work_not_due_yet_is_handed_back_for_its_delay() -> None:
    rung, stats, processed, _, _ = settle(returning(Later(2.5)))
    d = Told()
    await rung(work(d))
    assert d.said == [("nak", 2.5)]
    assert stats.handled == 0 and not await processed.exists(streams.processed_key("a", "m1"))


async def test_a_delivery_error_is_dead_lettered_and_acknowledged_only_once_stored() -> None:
    rung, stats, _, _, letters = settle(returning(Reject("no such order")))
    d = Told()
    await rung(work(d))
    assert letters.sent == [("rejected", "no such order", None)] and d.said == [("ack", None)]
    rung, stats, _, _, letters = settle(returning(DeliveryError("decode", "bad")), Letters(ok=False))
    d = Told()
    await rung(work(d))
    assert d.said[0][0] == "nak"  # the dead letter was not stored: the message is kept
    assert stats.dead_lettered == 1


async def test_a_failing_handler_is_retried_with_backoff_then_dead_lettered_with_its_history() -> None:
    rung, stats, _, failures, letters = settle(returning(HandlerFailed("on_ping raised KeyError: 'x'")))
    for attempt in (1, 2):
        d = Told(attempt)
        await rung(work(d))
        [(what, delay)] = d.said
        assert what == "nak" and delay is not None
        assert 0.8 * 0.5 * 2 ** (attempt - 1) <= delay <= 1.2 * 0.5 * 2 ** (attempt - 1)
    assert [e["n"] for e in await failures.history("m1")] == [1, 2]
    d = Told(3)
    await rung(work(d))
    [(kind, reason, extra)] = letters.sent
    assert kind == "handler_error" and "(delivery 3)" in reason and d.said == [("ack", None)]
    assert extra is not None and [e["n"] for e in json.loads(extra[h.DLQ_HISTORY])] == [1, 2, 3]
    assert await failures.history("m1") == []  # forgotten once dead-lettered
    assert (stats.errors, stats.retried, stats.dead_lettered) == (3, 2, 1)


async def test_the_guard_acknowledges_a_processed_message_without_running_it() -> None:
    ran: list[Work] = []

    async def below(w: Work) -> None:
        ran.append(w)

    processed = MemoryState()
    await processed.put(streams.processed_key("a", "m1"), b"1")
    rung, stats, _, _, _ = settle(Guard(below, processed, "a"))
    d = Told(attempt=1)  # a first delivery too: after a broker crash
    await rung(Work(d))
    assert (ran, d.said, stats.duplicates) == ([], [("ack", None)], 1)
    d = Told(headers={h.ID: "x" * 200})
    await rung(Work(d))
    assert rung.stats.dead_lettered == 1 and d.said == [("ack", None)]


async def test_a_delivery_past_the_limit_is_dead_lettered_unhandled_but_timers_wait() -> None:
    ran: list[int] = []

    async def below(w: Work) -> None:
        ran.append(w.delivery.attempt)

    failures = Failures(MemoryState(), "a", "i1")
    await failures.record("m1", 1, "boom")
    rung, _, _, _, letters = settle(GiveUp(below, failures, SETTINGS.max_deliver))
    rung.failures = failures
    d = Told(attempt=4)
    await rung(work(d))
    [(kind, _, extra)] = letters.sent
    assert kind == "max_deliveries" and ran == [] and extra is not None
    assert extra[h.DLQ_DELIVERIES] == "3"
    assert await failures.history("m1") == []
    await rung(work(Told(attempt=9, type_name="mesh.join_timer")))
    assert ran == [9]


async def test_the_time_limit_is_told_apart_from_a_timeout_inside_the_handler() -> None:
    async def slow(w: Work) -> None:
        await asyncio.sleep(5)

    async def asks(w: Work) -> None:
        raise TimeoutError("no answer from billing")

    with pytest.raises(HandlerFailed, match=r"ran past MESH_HANDLER_TIMEOUT=0\.05s"):
        await TimeLimit(slow, 0.05)(work(Told()))
    with pytest.raises(HandlerFailed, match="a call inside it timed out") as caught:
        await TimeLimit(asks, 5)(work(Told()))
    assert "MESH_HANDLER_TIMEOUT" not in caught.value.error
    with pytest.raises(Reject):  # a deliberate rejection passes through untouched
        await TimeLimit(returning(Reject("no")), 5)(work(Told()))


async def test_a_direct_failure_is_dead_lettered_and_the_requester_told() -> None:
    failed: list[tuple[str, str]] = []

    async def fail(d: Any, kind: str, reason: str) -> None:
        failed.append((kind, reason))

    def check(d: Any) -> Any:
        raise ValueError("the check broke")

    stats = Stats()
    ladder = Count(SettleDirect(Accept(Run(returning(None)), check), stats, fail, _Log()), stats)
    await ladder(Work(Told()))
    assert failed == [("internal_error", "ValueError: the check broke")]
    assert (stats.received, stats.in_flight, stats.handled) == (1, 0, 0)
