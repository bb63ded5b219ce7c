"""What the mesh keeps in JetStream, and with which durability settings.

=====================  ==========================  ==========================================
name                   holds                       retention
=====================  ==========================  ==========================================
``MESH_INBOX``         ``mesh.*.agent.>``          work queue: gone once its agent acks it
``MESH_EVENTS``        ``mesh.*.evt.>``            ``MESH_EVENT_RETENTION`` (7 days)
``MESH_TIMERS``        ``mesh.*.timer.*``          work queue: a join's deadline, until it fires
``MESH_DLQ``           ``mesh.*.dlq.>``            ``MESH_DLQ_RETENTION`` (14 days)
``MESH_AUDIT``         ``mesh_audit.>``            ``MESH_AUDIT_RETENTION``, append-only
``MESH_RECORD``        ``mesh_record.>``           ``MESH_RECORD_RETENTION`` (7 days): what each
                                                   process sent and received, per conversation
``MESH_CANCELS``       ``mesh_cancelled.*``        ``MESH_RECORD_RETENTION``, one per
                                                   conversation: `mesh cancel`s, read by agent
                                                   processes as they start
KV ``MESH_PROCESSED``  processed message ids       ``MESH_PROCESSED_TTL`` (1 day)
KV ``MESH_STATE``      joins, failure histories    7 days
KV ``MESH_SEEN``       ids of signed direct        twice ``MESH_REPLAY_WINDOW`` (10 minutes)
                       messages (replay refusal)
KV ``MESH_JOURNAL``    model replies and tool      ``MESH_JOURNAL_TTL`` (1 day)
                       results of each handling
=====================  ==========================  ==========================================

Each stream holds at most ``MESH_STREAM_MAX_BYTES``. The work queues (inbox, timers) refuse
what does not fit, and at most ``MESH_STREAM_MAX_MSGS_PER_SUBJECT`` messages per subject (one
agent in one conversation): what waits there is work nobody has done yet, so a sender is told
"full" rather than older work dropped. The history streams (events, dead letters) drop their
oldest instead: what they keep is mostly handled already, and refusing would stop the mesh's
events until the oldest aged out.

Each agent has one durable pull consumer on ``MESH_INBOX`` (its inbox), one on
``MESH_EVENTS`` filtered to the types it handles (if any) and one on ``MESH_TIMERS`` (if
it declares joins). Timers wait by redelivery, so they have a queue of their own: open
fan-outs never take unacknowledged slots from the agent's inbox. Both are named after the agent, so
every replica shares them and the server balances work across replicas.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from mesh.wire import subjects
from mesh.wire.envelope import is_id_token
from mesh.wire.settings import Settings

if TYPE_CHECKING:
    from mesh.agent.declaration import Agent

INBOX: Final = "MESH_INBOX"
EVENTS: Final = "MESH_EVENTS"
TIMERS: Final = "MESH_TIMERS"
MAX_OPEN_TIMERS: Final = 100_000  # a timer's consumer: deadlines waiting at once, per agent
PROCESSED: Final = "MESH_PROCESSED"
STATE: Final = "MESH_STATE"
AUDIT: Final = "MESH_AUDIT"  # append-only (mesh.runtime.audit)
RECORD: Final = "MESH_RECORD"  # the conversation record (mesh.observability.record)
CANCELS: Final = "MESH_CANCELS"  # the conversations cancelled (mesh.runtime.cancel)
SEEN: Final = "MESH_SEEN"  # ids of signed direct messages, shared by an agent's replicas
JOURNAL: Final = "MESH_JOURNAL"  # model replies and tool results by handling (mesh.llm.journal)
STATE_MAX_AGE: Final = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class StreamSpec:
    name: str
    subjects: list[str]
    max_age: float  # seconds, 0 = forever
    work_queue: bool = False
    dedupe_window: float = 120.0
    max_bytes: int = 0  # 0 = no limit
    max_msgs_per_subject: int = 0  # 0 = no limit
    discard_new: bool = False  # when full: refuse new messages (True) or drop the oldest
    append_only: bool = False  # no message can be deleted nor the stream purged
    direct: bool = False  # read with direct gets, in batches (allow_direct)

    def limits(self) -> dict[str, object]:
        """The limits an existing stream is compared on (see `ensure_stream`)."""
        return {
            "max_bytes": self.max_bytes,
            "max_age": self.max_age,
            "max_msgs_per_subject": self.max_msgs_per_subject,
            "discard": "new" if self.discard_new else "old",
        }


@dataclass(frozen=True, slots=True)
class BucketSpec:
    name: str
    ttl: float


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable pull consumer for one agent on one stream."""

    stream: str
    name: str
    filters: list[str] = field(default_factory=list)
    deliver_new: bool = False  # events: start from now, not from the retained history
    ack_wait: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 1000


def stream_specs(settings: Settings) -> list[StreamSpec]:
    window, size = settings.dedupe_window, settings.stream_max_bytes
    per_subject = settings.stream_max_msgs_per_subject

    def work_queue(name: str, kind: str) -> StreamSpec:
        pattern = f"{subjects.ROOT}.*.{kind}.*"
        return StreamSpec(name, [pattern], 0, True, window, size, per_subject, discard_new=True)

    return [
        work_queue(INBOX, subjects.AGENT),
        StreamSpec(
            EVENTS,
            [f"{subjects.ROOT}.*.{subjects.EVENT}.>"],
            settings.event_retention,
            dedupe_window=window,
            max_bytes=size,
            direct=True,
        ),
        work_queue(TIMERS, subjects.TIMER),
        StreamSpec(
            settings.dead_letter_stream,
            [subjects.dead_letter_pattern()],
            settings.dlq_retention,
            max_bytes=size,
        ),
        StreamSpec(
            AUDIT,
            [f"{subjects.AUDIT_ROOT}.>"],
            settings.audit_retention,
            dedupe_window=window,
            max_bytes=size,
            append_only=True,
        ),
        StreamSpec(
            RECORD,
            [f"{subjects.RECORD_ROOT}.>"],
            settings.record_retention,
            dedupe_window=window,
            max_bytes=size,
            direct=True,
        ),
        StreamSpec(
            CANCELS,
            [f"{subjects.CANCELLED_ROOT}.*"],
            settings.record_retention,
            dedupe_window=window,
            max_bytes=size,
            max_msgs_per_subject=1,
            direct=True,
        ),
    ]


def bucket_specs(settings: Settings) -> list[BucketSpec]:
    """The KV buckets, in this order: processed ids, state, seen ids, journal (new buckets
    go at the end). A direct message can be replayed up to the window after it was sent,
    which can be up to the window after it first arrived: its id is kept for twice the
    window."""
    return [
        BucketSpec(PROCESSED, settings.processed_ttl),
        BucketSpec(STATE, STATE_MAX_AGE),
        BucketSpec(SEEN, 2 * settings.replay_window),
        BucketSpec(JOURNAL, settings.journal_ttl),
    ]


def consumer_specs(
    agent: str, event_types: list[str], settings: Settings, *, timers: bool = False
) -> list[ConsumerSpec]:
    common = {
        "ack_wait": settings.ack_wait,
        # one more than allowed: that extra delivery is dead-lettered by the agent without
        # running the handler, so even a message that kills every process that takes it
        # ends in the dead letters (the server's own give-up is only an advisory)
        "max_deliver": settings.max_deliver + 1,
        "max_ack_pending": settings.max_ack_pending,
    }
    specs = [ConsumerSpec(INBOX, agent, [subjects.inbox_pattern(agent)], **common)]  # type: ignore[arg-type]
    if event_types:
        specs.append(
            ConsumerSpec(
                EVENTS,
                agent,
                [subjects.event_pattern(t) for t in sorted(event_types)],
                deliver_new=True,
                **common,  # type: ignore[arg-type]
            )
        )
    if timers:
        timer_common = {**common, "max_ack_pending": MAX_OPEN_TIMERS}
        specs.append(ConsumerSpec(TIMERS, agent, [subjects.timer_pattern(agent)], **timer_common))  # type: ignore[arg-type]
    return specs


def id_key(message_id: str) -> str:
    """A message id as one KV key token. Ids are any string (docs/protocol.md): one that is
    already a safe token (what the mesh makes) is kept readable; any other, with a colon, a
    space, a dot or unicode, becomes ``=`` and its hash, which no safe token can equal."""
    if is_id_token(message_id):
        return message_id
    digest = hashlib.blake2b(message_id.encode(errors="surrogatepass"), digest_size=18).digest()
    return "=" + base64.urlsafe_b64encode(digest).decode()


def event_types(agent: Agent) -> list[str]:
    """The types an agent receives as events (handlers not declared with ``events=False``)."""
    return sorted({h.mtype.name for h in agent.handlers if h.events})


def agent_consumer_specs(agent: Agent, settings: Settings) -> list[ConsumerSpec]:
    """The consumers an agent pulls from: created by its first replica to start, or before
    that by `mesh agents add`."""
    # any tool call may be parked (a policy rule); an MCP server's tools come only at start
    timers = bool(agent.joins) or len(agent.tools) > 0 or bool(agent.mcp_servers)
    return consumer_specs(agent.name, event_types(agent), settings, timers=timers)


def processed_key(agent: str, message_id: str) -> str:
    return f"{agent}.{id_key(message_id)}"


def failures_key(agent: str, message_id: str) -> str:
    return f"failures.{agent}.{id_key(message_id)}"


def join_key(agent: str, join_id: str) -> str:
    return f"joins.{agent}.{join_id}"
