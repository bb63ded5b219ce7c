"""Guards around model calls: a circuit breaker per provider, and a token bucket plus a
concurrency limit per tenant and per agent. Clocks are injectable, so tests need no sleeps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

Clock = Callable[[], float]
State = Literal["closed", "open", "half_open"]


class CircuitBreaker:
    """Closed: calls pass. After ``failures`` failures in a row it opens: calls are refused
    for ``reset_after`` seconds. Then it is half-open: one probe call passes; its success
    closes the breaker, its failure opens it again."""

    def __init__(self, failures: int = 5, reset_after: float = 30.0, clock: Clock = time.monotonic) -> None:
        self.threshold = failures
        self.reset_after = reset_after
        self.clock = clock
        self.state: State = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """May a call go through now? (In half-open state, only the one probe may.)"""
        if self.state == "open" and self.clock() - self.opened_at >= self.reset_after:
            self.state = "half_open"
            self._probing = False
        if self.state == "closed":
            return True
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.state, self.failures, self._probing = "closed", 0, False

    def failure(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            self.state, self.opened_at, self._probing = "open", self.clock(), False


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = burst
        self.updated = clock()

    def try_take(self, n: float = 1.0) -> float:
        """Take `n` tokens if there are enough and return 0; else take none and return the
        seconds until there will be."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    async def take(self, n: float = 1.0) -> None:
        wait = self.try_take(n)
        while wait > 0:  # sleep exactly until the bucket has refilled enough
            await asyncio.sleep(wait)
            wait = self.try_take(n)


class Limits:
    """Per-key (``tenant:<t>``, ``agent:<a>``) call rate and concurrency. A call over the
    limit waits (backpressure) rather than failing."""

    def __init__(self, rate: float, burst: float, concurrency: int, clock: Clock = time.monotonic) -> None:
        self.rate, self.burst, self.concurrency, self.clock = rate, burst, concurrency, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}

    def bucket(self, key: str) -> TokenBucket:
        if key not in self._buckets:
            self._buckets[key] = TokenBucket(self.rate, self.burst, self.clock)
        return self._buckets[key]

    def slots(self, key: str) -> asyncio.Semaphore:
        if key not in self._slots:
            self._slots[key] = asyncio.Semaphore(self.concurrency)
        return self._slots[key]

    @asynccontextmanager
    async def hold(self, tenant: str, agent: str) -> AsyncIterator[None]:
        keys = [f"tenant:{tenant}", f"agent:{agent}"]
        for key in keys:
            await self.bucket(key).take()
        async with self.slots(keys[0]), self.slots(keys[1]):
            yield
