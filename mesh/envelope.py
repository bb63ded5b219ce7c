"""Message metadata on the wire: header names, and the parsed envelope of a delivery.

See docs/protocol.md for the contract other languages follow.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Final

import msgspec
from nats.nuid import NUID

from mesh import subjects
from mesh.codec import JSON
from mesh.errors import DeliveryError
from mesh.subjects import Address

TYPE: Final = "Mesh-Type"
VERSION: Final = "Mesh-Version"
ID: Final = "Mesh-Id"
NATS_MSG_ID: Final = "Nats-Msg-Id"
CONVERSATION: Final = "Mesh-Conversation"
CAUSATION: Final = "Mesh-Causation"
SENDER: Final = "Mesh-Sender"
SENT_AT: Final = "Mesh-Sent-At"
HOP: Final = "Mesh-Hop"
DEADLINE: Final = "Mesh-Deadline"
REPLY_TO: Final = "Mesh-Reply-To"
JOIN: Final = "Mesh-Join"  # <owner>.<join id>/<branch>: the answer to this work belongs to that join
ANSWER: Final = "Mesh-Answer"  # <owner>.<join id>/<branch>: this message is that branch's answer
ROUTE: Final = "Mesh-Route"  # agents still to visit, comma-separated (a declared pipeline)
DEPTH: Final = "Mesh-Depth"  # delegation nesting depth
GATHERS: Final = "Mesh-Gathers"  # on a join's output: the ids of the messages it gathered
CONTENT_TYPE: Final = "Content-Type"
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

DLQ_REASON: Final = "Mesh-Dlq-Reason"
DLQ_KIND: Final = "Mesh-Dlq-Kind"
DLQ_SUBJECT: Final = "Mesh-Dlq-Subject"
DLQ_AGENT: Final = "Mesh-Dlq-Agent"
DLQ_AT: Final = "Mesh-Dlq-At"
DLQ_DELIVERIES: Final = "Mesh-Dlq-Deliveries"
DLQ_HISTORY: Final = "Mesh-Dlq-History"  # JSON list: one {n, at_ns, instance, error} per failure
DLQ_ORIGINAL_PREFIX: Final = "Mesh-Dlq-Orig-"  # + the original Nats-* header's name

_nuid = NUID()


def new_id() -> str:
    """A new unique id for a message or a conversation (22 characters, subject-safe)."""
    return _nuid.next().decode()


class Envelope(msgspec.Struct, frozen=True):
    """A received message: where it came, its metadata, and its undecoded body.

    A msgspec Struct, not a frozen dataclass: one is built per delivery, and a frozen
    dataclass sets each of its 18 fields through object.__setattr__."""

    address: Address
    subject: str
    data: bytes
    headers: dict[str, str]
    reply: str  # the NATS reply subject, "" if none
    id: str
    type_name: str
    version: int | None
    conversation: str
    causation: str
    sender: str
    sent_at_ns: int
    hop: int
    deadline_ms: int | None
    content_type: str
    join: str = ""
    answer: str = ""
    route: tuple[str, ...] = ()
    depth: int = 0

    @property
    def reply_to(self) -> str:
        """Where an answer to this message goes: the NATS reply subject or Mesh-Reply-To."""
        return self.reply or self.headers.get(REPLY_TO, "")


def open_envelope(
    subject: str, data: bytes, headers: dict[str, str] | None, reply: str, fallback_id: str = ""
) -> Envelope:
    """Parse the metadata of a delivery; DeliveryError says which header is wrong.

    `fallback_id` names a message that came without a Mesh-Id (a stored message's stream
    sequence), so its id stays the same when it is delivered again.
    """
    address = subjects.parse(subject)
    if address is None or not subjects.is_conversation_id(address.conversation):
        raise DeliveryError(
            "bad_subject",
            f"subject {subject!r} is not a mesh subject: mesh.<conversation>.<kind>.<target>, "
            f"with a conversation id of 1-128 characters of A-Z, a-z, 0-9, '-' or '_'",
        )
    h = headers or {}
    reply_to = h.get(REPLY_TO)
    if reply_to and not subjects.is_reply_target(reply_to):
        raise DeliveryError(
            "bad_header",
            f"{REPLY_TO} {reply_to!r} is not a place an agent answers to: use a mesh subject "
            f"(mesh.<conversation>.agent|reply|evt.<target>) or an _INBOX. subject",
        )
    type_name = h.get(TYPE) or (address.target if address.kind == subjects.EVENT else "")
    if not type_name:
        raise DeliveryError("bad_header", f"no {TYPE} header on {subject!r}; it is required on inboxes")
    return Envelope(
        address=address,
        subject=subject,
        data=data,
        headers=h,
        reply=reply,
        id=h.get(ID) or h.get(NATS_MSG_ID) or fallback_id or new_id(),
        type_name=type_name,
        version=_int(h, VERSION),
        conversation=address.conversation,
        causation=h.get(CAUSATION, ""),
        sender=h.get(SENDER, ""),
        sent_at_ns=_int(h, SENT_AT) or 0,
        hop=_hop(h),
        deadline_ms=_int(h, DEADLINE),
        content_type=_media_type(h.get(CONTENT_TYPE)),
        join=h.get(JOIN, ""),
        answer=h.get(ANSWER, ""),
        route=tuple(a for a in h.get(ROUTE, "").split(",") if a),
        depth=_int(h, DEPTH) or 0,
    )


def _hop(h: dict[str, str]) -> int:
    hop = _int(h, HOP) or 0
    if hop < 0:
        raise DeliveryError("bad_header", f"{HOP} {hop} is negative")
    return hop


def _media_type(raw: str | None) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``; absent -> JSON."""
    if not raw:
        return JSON
    return raw.split(";", 1)[0].strip().lower()


def _int(h: dict[str, str], name: str) -> int | None:
    raw = h.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise DeliveryError("bad_header", f"header {name}: {raw!r} is not an integer") from None


def derive_id(parent: str, agent: str, n: int) -> str:
    """The id of the n-th message `agent` sends while handling `parent`: the same on every
    redelivery, so a re-run handler's messages are dropped by the stream's dedupe."""
    digest = hashlib.blake2b(f"{parent}/{agent}/{n}".encode(), digest_size=16).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def now_ns() -> int:
    return time.time_ns()
