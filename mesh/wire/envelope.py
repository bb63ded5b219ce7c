"""Message metadata on the wire: header names, and the parsed envelope of a delivery.

See docs/protocol.md for the contract other languages follow.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Final

import msgspec
from nats.nuid import NUID

from mesh.wire import subjects
from mesh.wire.codec import JSON
from mesh.wire.errors import DeliveryError
from mesh.wire.subjects import Address

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
REPLY_GRANT: Final = "Mesh-Reply-Grant"  # <public key>.<signature>: the reply target's owner agrees
JOIN: Final = "Mesh-Join"  # <owner>.<join id>/<branch>: the answer to this work belongs to that join
ANSWER: Final = "Mesh-Answer"  # <owner>.<join id>/<branch>: this message is that branch's answer
ROUTE: Final = "Mesh-Route"  # agents still to visit, comma-separated (a declared pipeline)
DEPTH: Final = "Mesh-Depth"  # delegation nesting depth
GATHERS: Final = "Mesh-Gathers"  # on a join's output: the ids of the messages it gathered
REDRIVEN_FROM: Final = "Mesh-Redriven-From"  # a re-driven dead letter: its original Mesh-Sender
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
DLQ_TRUNCATED: Final = "Mesh-Dlq-Truncated"  # the body's full size; the rest is in a continuation
DLQ_ID: Final = "Mesh-Dlq-Id"  # a truncated letter's id, which its continuation names
DLQ_OF: Final = "Mesh-Dlq-Of"  # on a continuation: the Mesh-Dlq-Id of its letter
DLQ_OFFSET: Final = "Mesh-Dlq-Offset"  # on a continuation: where its bytes start in the body
DLQ_CUT_HEADERS: Final = "Mesh-Dlq-Cut-Headers"  # original headers cut short to make it fit
DLQ_MASKED: Final = "Mesh-Dlq-Masked"  # secret headers left out of the letter: their names only

_nuid = NUID()

MAX_ID: Final = 128  # characters of Mesh-Id, Nats-Msg-Id, Mesh-Causation (any characters)
MAX_NAME: Final = 128  # characters of Mesh-Sender, Content-Type
MAX_INT: Final = 20  # characters of an integer header
MAX_ROUTE: Final = 32  # agents in Mesh-Route
MAX_LINK: Final = 256  # characters of Mesh-Join, Mesh-Answer
GRANT_LEN: Final = 56 + 1 + 86  # Mesh-Reply-Grant: a public key, ".", a signature
_ID_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# <owner agent>.<join id>/<branch>: Mesh-Join and Mesh-Answer
_LINK = re.compile(r"^([a-z0-9][a-z0-9_-]{0,63})\.([A-Za-z0-9_-]{1,64})/([0-9]{1,6}|judge|timer)$")


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
    if len(subject) > subjects.MAX_SUBJECT:
        raise DeliveryError(
            "bad_subject", f"subject is {len(subject)} bytes; the limit is {subjects.MAX_SUBJECT}"
        )
    address = subjects.parse(subject)
    if address is None or not subjects.is_conversation_id(address.conversation):
        raise DeliveryError(
            "bad_subject",
            f"subject {show(subject)} is not a mesh subject: mesh.<conversation>.<kind>.<target>, "
            f"with a conversation id of 1-128 characters of A-Z, a-z, 0-9, '-' or '_'",
        )
    h = headers or {}
    reply_to = h.get(REPLY_TO)
    if reply_to and not subjects.is_reply_target(reply_to):
        raise DeliveryError(
            "bad_header",
            f"{REPLY_TO} {show(reply_to)} is not a place an agent answers to: use a mesh subject "
            f"(mesh.<conversation>.agent|reply|evt.<target>, at most {subjects.MAX_SUBJECT} bytes) "
            f"or an _INBOX. subject",
        )
    type_name = h.get(TYPE) or (address.target if address.kind == subjects.EVENT else "")
    if not type_name:
        raise DeliveryError("bad_header", f"no {TYPE} header on {show(subject)}; it is required on inboxes")
    if len(type_name) > subjects.MAX_TYPE_NAME:
        raise DeliveryError("bad_header", f"{TYPE} is {len(type_name)} characters; the limit is 128")
    join, answer = h.get(JOIN, ""), h.get(ANSWER, "")
    if join and not _LINK.match(join):
        raise DeliveryError("bad_header", f"{JOIN} {show(join)} is not <agent>.<join id>/<branch>")
    if len(answer) > MAX_LINK:
        raise DeliveryError("bad_header", f"{ANSWER} is {len(answer)} characters; the limit is {MAX_LINK}")
    grant = h.get(REPLY_GRANT, "")
    if grant and (len(grant) != GRANT_LEN or not grant.isascii()):
        why = f"{REPLY_GRANT} is not <public key>.<signature>, {GRANT_LEN} characters"
        raise DeliveryError("bad_header", why)
    return Envelope(
        address=address,
        subject=subject,
        data=data,
        headers=h,
        reply=reply,
        id=message_id(h, fallback_id) or new_id(),
        type_name=type_name,
        version=_int(h, VERSION),
        conversation=address.conversation,
        causation=_text(h, CAUSATION, MAX_ID),
        sender=_text(h, SENDER, MAX_NAME),
        sent_at_ns=_int(h, SENT_AT) or 0,
        hop=_hop(h),
        deadline_ms=_int(h, DEADLINE),
        content_type=_media_type(_text(h, CONTENT_TYPE, MAX_NAME)),
        join=join,
        answer=answer,
        route=_route(h.get(ROUTE, "")),
        depth=_int(h, DEPTH) or 0,
    )


def message_id(headers: dict[str, str], fallback: str = "") -> str:
    """The id of a delivery: Mesh-Id, else Nats-Msg-Id, else `fallback` (a stored message's
    ``<stream>-<sequence>``). The one place that says so: the runtime's duplicate guard and
    the envelope must agree. DeliveryError if the id is longer than MAX_ID."""
    got = headers.get(ID) or headers.get(NATS_MSG_ID) or fallback
    if len(got) > MAX_ID:
        raise DeliveryError("bad_header", f"message id is {len(got)} characters; the limit is {MAX_ID}")
    return got


def is_id_token(value: str) -> bool:
    """An id that is safe as one subject token or KV key token: 1-64 of A-Z a-z 0-9 - _
    (every id the mesh makes, and every join and approval id)."""
    return _ID_TOKEN.match(value) is not None


def parse_link(value: str) -> tuple[str, str, str] | None:
    """``<owner>.<join id>/<branch>`` (Mesh-Join, Mesh-Answer) -> its parts; None if malformed."""
    m = _LINK.match(value)
    return None if m is None else (m[1], m[2], m[3])


def _route(raw: str) -> tuple[str, ...]:
    if not raw:
        return ()
    route = tuple(a for a in raw.split(",", MAX_ROUTE) if a)
    if len(route) > MAX_ROUTE or not all(subjects.is_agent_name(a) for a in route):
        raise DeliveryError(
            "bad_header", f"{ROUTE} {show(raw)} is not a list of at most {MAX_ROUTE} agent names"
        )
    return route


def _text(h: dict[str, str], name: str, limit: int) -> str:
    raw = h.get(name, "")
    if len(raw) > limit:
        raise DeliveryError("bad_header", f"{name} is {len(raw)} characters; the limit is {limit}")
    return raw


def show(value: str, limit: int = 80) -> str:
    """A wire value in an error message: quoted, and cut short when hostile."""
    return repr(value) if len(value) <= limit else f"{value[:limit]!r}... ({len(value)} characters)"


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
    if len(raw) > MAX_INT:
        raise DeliveryError("bad_header", f"header {name}: {show(raw)} is not an integer")
    try:
        return int(raw)
    except ValueError:
        raise DeliveryError("bad_header", f"header {name}: {show(raw)} is not an integer") from None


_B32: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_B32_PAIRS: Final = tuple(a + b for a in _B32 for b in _B32)  # 10 bits -> two characters


def derive_id(parent: str, agent: str, n: int) -> str:
    """The id of the n-th message `agent` sends while handling `parent`: the same on every
    redelivery, so a re-run handler's messages are dropped by the stream's dedupe."""
    digest = hashlib.blake2b(f"{parent}/{agent}/{n}".encode(errors="surrogatepass"), digest_size=16).digest()
    # base32 (RFC 4648, unpadded: 26 characters of A-Z and 2-7), so an id never starts with
    # '-' (which a command line would take for an option) and is one token of a subject or a
    # KV key. The 128 bits and two zero bits, ten at a time: base64.b32encode's loop in
    # Python took 5 µs of every send, this 1.5
    b = int.from_bytes(digest, "big") << 2
    t = _B32_PAIRS
    return (
        t[b >> 120]
        + t[(b >> 110) & 1023]
        + t[(b >> 100) & 1023]
        + t[(b >> 90) & 1023]
        + t[(b >> 80) & 1023]
        + t[(b >> 70) & 1023]
        + t[(b >> 60) & 1023]
        + t[(b >> 50) & 1023]
        + t[(b >> 40) & 1023]
        + t[(b >> 30) & 1023]
        + t[(b >> 20) & 1023]
        + t[(b >> 10) & 1023]
        + t[b & 1023]
    )


def now_ns() -> int:
    return time.time_ns()
