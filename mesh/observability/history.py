"""Reading the conversation record (mesh.observability.record) back: one conversation's
messages with what became of each, and a summary of recent conversations.

Each message is recorded by the process that sent it and by each process that received
it; `conversation` merges those entries by message id into one `Recorded` message with
its `deliveries`. The body and headers come from the sender's entry when there is one (as
it went out), else from a receiver's.

A conversation's status, from its record:

- ``failed``: a message was dead-lettered (on its last delivery), an approval expired
  (its parked message is dead-lettered), or a request was answered with a delivery failure;
- ``waiting``: an approval was requested and not yet resolved;
- ``running``: a message sent to an agent's inbox or direct line has no final outcome yet
  (not handled, not dead-lettered);
- ``done``: none of these.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Final

import msgspec

from mesh.observability import record as rec
from mesh.observability.tap import TapLine, decode_any, observe, tap
from mesh.transport.streams import RECORD
from mesh.wire import envelope as h
from mesh.wire import subjects

if TYPE_CHECKING:
    from mesh.transport.base import Subscription, Transport

Slot = tuple[str, str, int]
FAILED: Final = "failed"
WAITING: Final = "waiting"
RUNNING: Final = "running"
DONE: Final = "done"
SKEW_NS: Final = 3600 * 10**9  # how far a sender's clock may be from the server's
_FINAL: Final = frozenset({rec.HANDLED, rec.DEAD_LETTER, rec.DUPLICATE})
_APPROVAL_REQUEST: Final = "approval.request"
_APPROVAL_RESOLVED: Final = "approval.resolved"
_FAILURE: Final = "mesh.delivery_failed"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a message to an agent, and what became of it."""

    agent: str
    outcome: str
    attempt: int
    millis: float
    reason: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    at: float = 0.0  # when it was recorded (seconds since the epoch)


@dataclass(slots=True)
class Recorded:
    """One message of a conversation, as recorded."""

    id: str
    subject: str  # where it went
    headers: dict[str, str]
    data: bytes
    sent_by: str = ""  # the writer of the sender's entry ("" if only receivers recorded it)
    omitted: int = 0  # the size of a body too large to record
    # where its sender sent it: (sender, the message it was handling, the how-many-th send of
    # that handling it was); the same work sends the same messages from the same slots
    slot: Slot = ("", "", 0)
    seq: int = 0  # the stream sequence of its first entry
    at: float = 0.0  # when its first entry was stored
    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def type(self) -> str:
        return self.headers.get(h.TYPE, "?")

    @property
    def sender(self) -> str:
        return self.headers.get(h.SENDER, "?")

    @property
    def causation(self) -> str:
        return self.headers.get(h.CAUSATION, "")

    @property
    def sent_ns(self) -> int:
        """When its sender says it sent it, if that is within `SKEW` of when it was stored
        (the server's clock); else when it was stored: a sender's claim is not trusted to
        move a conversation into another year."""
        stored = int(self.at * 1e9)
        raw = self.headers.get(h.SENT_AT, "")
        if not raw.isdigit() or len(raw) > 20:
            return stored
        claimed = int(raw)
        return claimed if not stored or abs(claimed - stored) <= SKEW_NS else stored

    @property
    def trace_id(self) -> str:
        parts = self.headers.get(h.TRACEPARENT, "").split("-")
        return parts[1] if len(parts) == 4 else ""

    @property
    def kind(self) -> str:
        address = subjects.parse(self.subject)
        return address.kind if address is not None else subjects.REPLY

    def body(self) -> Any:
        if self.omitted:
            return f"<{self.omitted} bytes, too large to record>"
        return decode_any(self.data, self.headers.get(h.CONTENT_TYPE, ""))

    def line(self) -> TapLine:
        """As `mesh tap` shows a message, with its whole body."""
        return observe(_AsSeen(self.subject, self.data, self.headers), self.sent_ns or None, full=True)


class Summary(msgspec.Struct, frozen=True):
    """A conversation at a glance (`mesh conversations`)."""

    id: str
    started: float  # seconds since the epoch
    ended: float
    agents: tuple[str, ...]
    status: str
    messages: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    trace_ids: tuple[str, ...]

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    def to_dict(self) -> dict[str, Any]:
        return {**msgspec.structs.asdict(self), "duration": round(self.duration, 3)}


@dataclass(frozen=True, slots=True)
class _AsSeen:
    subject: str
    data: bytes
    headers: dict[str, str]


async def entries(transport: Transport, pattern: str, start: int = 1) -> AsyncIterator[Any]:
    """Every record entry on `pattern` from stream sequence `start`, oldest first."""
    seq = start
    while batch := await transport.stored_many(RECORD, seq, pattern):
        for entry in batch:
            yield entry
        seq = int(batch[-1].seq) + 1


def merge(stored: Iterable[Any]) -> list[Recorded]:
    """Entries (subject, data, headers, seq, at) merged into messages, in stream order.

    Which copy of a message is shown: a writer records only under its own name, and a
    receiving agent records what it took after checking who sent it (signed envelopes).
    So the copy recorded by the sender that receivers saw wins; with no such copy, the
    copy a receiver took; with no receiver, the first copy whose writer is its sender, else
    the first. An entry that does not decode is skipped."""
    messages: dict[str, Recorded] = {}
    sent: dict[str, list[tuple[str, rec.Copy, Slot]]] = {}

    def message(copy: rec.Copy, seq: int, at: float) -> Recorded:
        msg_id = copy.headers[h.ID]
        found = messages.get(msg_id)
        if found is None:
            found = messages[msg_id] = Recorded(msg_id, copy.subject, copy.headers, copy.data, seq=seq, at=at)
        return found

    for stored_entry in stored:
        try:
            entry = rec.decode_entry(stored_entry.data)
        except msgspec.DecodeError:
            continue
        writer = str(stored_entry.subject).rsplit(".", 1)[-1]
        at, seq = float(getattr(stored_entry, "at", 0.0) or 0.0), int(stored_entry.seq)
        got = entry.received
        if got is not None and got.headers.get(h.ID):
            m = message(got, seq, at)
            if not m.deliveries:  # the first receiver's copy, until a sender's is chosen
                m.subject, m.headers, m.data, m.omitted = got.subject, got.headers, got.data, entry.omitted
            m.deliveries.append(_delivery(writer, entry, at))
        handled = got.headers.get(h.ID, "") if got is not None else f"#{seq}"
        for n, copy in enumerate(entry.sent):
            if copy.headers.get(h.ID):
                message(copy, seq, at)
                sent.setdefault(copy.headers[h.ID], []).append((writer, copy, (writer, handled, n)))
    for msg_id, candidates in sent.items():
        m = messages[msg_id]
        if m.deliveries:
            chosen = next((c for c in candidates if c[0] == m.sender), None)
            if chosen is None:  # a client's, under its role: the one with what receivers saw
                chosen = next((c for c in candidates if c[1].data == m.data), None)
        else:
            chosen = next((c for c in candidates if c[0] == c[1].headers.get(h.SENDER)), candidates[0])
        if chosen is not None:
            m.sent_by, copy, m.slot = chosen
            m.subject, m.headers, m.data, m.omitted = copy.subject, copy.headers, copy.data, 0
    return list(messages.values())


def _delivery(writer: str, entry: rec.Entry, at: float) -> Delivery:
    return Delivery(
        agent=writer,
        outcome=entry.outcome or "?",
        attempt=entry.delivery,
        millis=entry.millis,
        reason=entry.reason,
        input_tokens=entry.input_tokens,
        output_tokens=entry.output_tokens,
        cost_usd=entry.cost_usd,
        at=at,
    )


async def conversation(transport: Transport, conversation_id: str) -> list[Recorded]:
    """Every recorded message of one conversation, in the order they were first recorded."""
    pattern = subjects.record_pattern(subjects.conversation_id(conversation_id), "*")
    return merge([e async for e in entries(transport, pattern)])


def summarize(conversation_id: str, messages: list[Recorded]) -> Summary:
    agents: set[str] = set()
    status_failed = waiting = running = False
    asked: set[str] = set()
    resolved: set[str] = set()
    tokens_in = tokens_out = 0
    cost = 0.0
    times: list[float] = []
    traces: list[str] = []
    for m in messages:
        times.append(m.sent_ns / 1e9)
        if m.trace_id and m.trace_id not in traces:
            traces.append(m.trace_id)
        address = subjects.parse(m.subject)
        if address is not None and address.kind in (subjects.AGENT, subjects.DIRECT):
            agents.add(address.target)
        if m.type == _FAILURE:
            status_failed = True
        if m.type in (_APPROVAL_REQUEST, _APPROVAL_RESOLVED):
            approval = _field(m, "approval")
            (asked if m.type == _APPROVAL_REQUEST else resolved).add(approval)
            if m.type == _APPROVAL_RESOLVED and _field(m, "status") == "expired":
                status_failed = True  # its parked message was dead-lettered
        for d in m.deliveries:
            agents.add(d.agent)
            times.append(d.at)
            tokens_in, tokens_out, cost = (
                tokens_in + d.input_tokens,
                tokens_out + d.output_tokens,
                cost + d.cost_usd,
            )
            if d.outcome == rec.DEAD_LETTER:
                status_failed = True
        if m.kind in (subjects.AGENT, subjects.DIRECT) and not any(d.outcome in _FINAL for d in m.deliveries):
            running = True
    waiting = bool(asked - resolved)
    status = FAILED if status_failed else WAITING if waiting else RUNNING if running else DONE
    times = [t for t in times if t > 0]
    return Summary(
        id=conversation_id,
        started=min(times, default=0.0),
        ended=max(times, default=0.0),
        agents=tuple(sorted(agents)),
        status=status,
        messages=len(messages),
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cost_usd=round(cost, 6),
        trace_ids=tuple(traces),
    )


async def recent(transport: Transport, *, limit: int = 20, scan: int = 20_000) -> list[Summary]:
    """The `limit` conversations recorded most recently (newest first), found among the last
    `scan` record entries."""
    return await Recent(transport, scan=scan).read(limit)


class Recent:
    """The conversations recorded most recently, kept up to date: the first `read` takes the
    last `scan` record entries, each later one only the entries stored since, so a list that
    is read again and again (the web view's) costs what the mesh recorded meanwhile, not a
    scan. At most `scan` entries are held: the conversations touched longest ago go first."""

    def __init__(self, transport: Transport, *, scan: int = 20_000) -> None:
        self.transport = transport
        self.scan = scan
        self.fetched = 0  # entries read from the stream, in all
        self._next = 0  # the stream sequence to read from next (0: none read yet)
        self.held = 0  # entries held now (at most `scan`)
        # each conversation's entries, the one touched most recently last; and its summary
        self._entries: dict[str, deque[Any]] = {}
        self._summaries: dict[str, Summary] = {}

    async def read(self, limit: int = 20) -> list[Summary]:
        first, last = await self.transport.stream_bounds(RECORD)
        # the first reading; or the stream forgot what was read, or more than `scan` entries
        # came since (nobody read for a while): start again from the newest `scan`
        if not self._next or self._next < max(first, last - self.scan + 1):
            self._entries.clear()
            self._summaries.clear()
            self.held = 0
            self._next = max(first, last - self.scan + 1, 1)
        async for entry in entries(self.transport, f"{subjects.RECORD_ROOT}.>", self._next):
            self._take(entry)
        newest = list(reversed(self._entries))[:limit]
        for conv in newest:
            if conv not in self._summaries:
                self._summaries[conv] = summarize(conv, merge(self._entries[conv]))
        return [self._summaries[c] for c in newest]

    def _take(self, entry: Any) -> None:
        self.fetched += 1
        self._next = int(entry.seq) + 1
        parts = str(entry.subject).split(".")
        if len(parts) < 3:
            return
        conv = parts[1]
        kept = self._entries.pop(conv, None) or deque()
        kept.append(entry)
        self._entries[conv] = kept  # now the most recently touched
        self._summaries.pop(conv, None)
        self.held += 1
        while self.held > self.scan:
            oldest = next(iter(self._entries))
            if oldest == conv:  # one conversation of more than `scan` entries: its newest
                kept.popleft()
                self.held -= 1
            else:
                self.held -= len(self._entries.pop(oldest))
                self._summaries.pop(oldest, None)


def _field(m: Recorded, name: str) -> str:
    body = m.body()
    return str(body.get(name, "")) if isinstance(body, dict) else ""


async def follow(
    transport: Transport,
    conversation_id: str,
    on_line: Callable[[TapLine], Awaitable[None] | None],
    *,
    full: bool = False,
) -> Subscription:
    """`mesh tap -c <conversation> --from-start`: every recorded message of the conversation,
    then the ones that come live, each once. The live tap starts first and holds what it
    sees while the record is read, so nothing falls between the two."""
    seen: set[str] = set()
    held: list[TapLine] | None = []

    async def show(line: TapLine) -> None:
        if line.id and not line.dead_letter:
            if line.id in seen:
                return
            seen.add(line.id)
        result = on_line(line)
        if result is not None:
            await result

    async def live(line: TapLine) -> None:
        if held is not None:
            held.append(line)
        else:
            await show(line)

    sub = await tap(transport, subjects.conversation_pattern(conversation_id), live, full=full)
    for m in await conversation(transport, conversation_id):
        await show(m.line() if full else replace(m.line(), body=None))
    waiting = held or []
    held = None
    for line in waiting:
        await show(line)
    return sub
