"""Per-sender quotas: how many messages one agent process takes from one sender.

A token bucket per sender: it holds at most `burst` tokens, gains `rate` a second, and each
delivery from the sender takes one. The sender is the ``Mesh-Sender`` header for now (what a
sender says it is); once senders are authenticated, the authenticated identity.

The table of buckets is bounded: a bucket that has filled up again is the same as a new one
and is forgotten first, and when `MAX_SENDERS` senders all have partly used buckets, any
further sender shares one overflow bucket. So a sender that makes up a new name for every
message gains nothing past that bound, and memory stays bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

MAX_SENDERS: Final = 10_000
OVERFLOW: Final = "\x00overflow"  # never a header value: the bucket shared past MAX_SENDERS


class Quotas:
    """Token buckets by sender. `clock` is monotonic seconds (injectable for tests)."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_senders: int = MAX_SENDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_senders = max_senders
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, when counted)
        self._swept = float("-inf")

    def take(self, sender: str) -> bool:
        """Take one token for `sender`: False when its bucket is empty (over its quota)."""
        now = self.clock()
        key = sender if sender in self._buckets else self._admit(sender, now)
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True

    def _admit(self, sender: str, now: float) -> str:
        """The key a new sender is counted under: its own, while there is room."""
        if len(self._buckets) >= self.max_senders and now - self._swept >= 1.0:
            self._swept = now  # at most once a second: a sweep reads every bucket
            self._forget_full(now)
        return sender if len(self._buckets) < self.max_senders else OVERFLOW

    def _forget_full(self, now: float) -> None:
        full = [
            k
            for k, (tokens, then) in self._buckets.items()
            if k != OVERFLOW and tokens + (now - then) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]

    def __len__(self) -> int:
        return len(self._buckets)
