"""Per-sender quotas (mesh.runtime.quota): the token buckets alone, with a clock of our own.
What an agent does with a sender over its quota is in test_base.py, on both buses."""

from __future__ import annotations

from mesh.runtime.quota import OVERFLOW, Quotas


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_sender_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    q = Quotas(rate=2.0, burst=3, clock=clock)
    assert [q.take("flood") for _ in range(4)] == [True, True, True, False]
    assert q.take("calm")  # a bucket of its own
    clock.now += 0.5  # one token back
    assert [q.take("flood"), q.take("flood")] == [True, False]
    clock.now += 60  # never more than the burst
    assert [q.take("flood") for _ in range(4)] == [True, True, True, False]


def test_made_up_sender_names_share_one_bucket_past_the_bound() -> None:
    clock = Clock()
    q = Quotas(rate=1.0, burst=2, max_senders=2, clock=clock)
    assert q.take("a") and q.take("b")  # both partly used: neither can be forgotten
    assert q.take("c1") and q.take("c2")  # the overflow bucket, shared
    assert not q.take("c3")
    assert OVERFLOW not in ("a", "b") and len(q) == 3
    clock.now += 5  # a and b are full again, the same as new: forgotten to make room
    assert q.take("c4") and q.take("c4") and not q.take("c4")  # c4 has a bucket of its own now
