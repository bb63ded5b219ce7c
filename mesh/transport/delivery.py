"""A message as the transport hands it to the runtime, and what can be done with it.

A stored delivery (JetStream: inboxes, events, timers) is acknowledged when its work is
done, handed back with a delay to be delivered again, terminated, or kept alive while a
long handler runs. A direct delivery (core NATS) is handled at most once: those calls do
nothing. The runtime sees only this type, never a client library's message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Later:
    """Not due yet: hand the delivery back to the server for `delay` seconds."""

    delay: float


class Delivery(Protocol):
    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str  # where a requester waits for the answer ("" if none, and always on stored ones)

    @property
    def stored(self) -> bool:
        """True for a message from a stream (acknowledged, redelivered until then)."""
        ...

    @property
    def attempt(self) -> int:
        """Which delivery of the message this is: 1 the first time (always 1 for direct)."""
        ...

    @property
    def origin(self) -> str:
        """``<stream>-<sequence>`` of a stored message ("" for direct): the same on every
        delivery, so it names a message that came without an id."""
        ...

    async def ack(self) -> None:
        """The work is done: the stream forgets the message (for this consumer)."""
        ...

    async def nak(self, delay: float | None = None) -> None:
        """Deliver it again, after `delay` seconds (at once if None)."""
        ...

    async def in_progress(self) -> None:
        """Still being worked on: restart the server's acknowledgement timer."""
        ...


class Direct:
    """A core NATS delivery: at most once, so acknowledging means nothing."""

    __slots__ = ("data", "headers", "reply", "subject")

    stored = False
    attempt = 1
    origin = ""

    def __init__(self, subject: str, data: bytes, headers: dict[str, str] | None, reply: str) -> None:
        self.subject = subject
        self.data = data
        self.headers = headers
        self.reply = reply

    async def ack(self) -> None:
        return None

    async def nak(self, delay: float | None = None) -> None:
        return None

    async def in_progress(self) -> None:
        return None


class Consumer(Protocol):
    """A replica's pull from a durable consumer: it hands out deliveries while fewer than its
    capacity are in hand; `done` gives one slot back."""

    def done(self) -> None: ...

    async def stop(self) -> None:
        """Take nothing more (what is in hand is finished or handed back by the runtime)."""
        ...

    async def close(self) -> None: ...
