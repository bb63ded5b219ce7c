"""The subject scheme, built and parsed in one place.

Every mesh subject puts the conversation id second, so one conversation is the single
pattern ``mesh.<conversation>.>``:

=====================================  ===============================================
``mesh.<conv>.evt.<type name>``         an event of a message type (external or agent)
``mesh.<conv>.live.<type name>``        a live-only event (core NATS, never stored: streamed chunks)
``mesh.<conv>.agent.<agent name>``      an agent's durable inbox (JetStream: sends, handoffs)
``mesh.<conv>.direct.<agent name>``     an agent's direct line (core NATS: requests, at most once)
``mesh.<conv>.timer.<agent name>``      an agent's durable timers (JetStream: join deadlines)
``mesh.<conv>.reply.<token>``           a reply to a requester outside the mesh
``mesh.<conv>.dlq.<agent name>``        a dead letter rejected by that agent
``mesh.<conv>.cancel.all``              stop the conversation (core NATS, to every agent process)
=====================================  ===============================================

Audit records live outside the mesh's root, ``mesh_audit.<writer>.<instance>`` (one chain per
writing process), and so does the conversation record, ``mesh_record.<conv>.<writer>`` (what
each process sent and received, mesh.observability.record): nothing that watches ``mesh.>``
sees them twice.
"""

from __future__ import annotations

import re
from typing import Final, Literal

import msgspec

from mesh.wire.errors import ConfigError

ROOT: Final = "mesh"
EVENT: Final = "evt"
AGENT: Final = "agent"
DIRECT: Final = "direct"
REPLY: Final = "reply"
DEAD_LETTER: Final = "dlq"
TIMER: Final = "timer"
LIVE: Final = "live"
CANCEL: Final = "cancel"

Kind = Literal["evt", "agent", "direct", "reply", "dlq", "timer", "live", "cancel"]
_KINDS: Final = frozenset((EVENT, AGENT, DIRECT, REPLY, DEAD_LETTER, TIMER, LIVE, CANCEL))

_AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_CONVERSATION = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TOKEN_CHARS = re.compile(r"^[\x21-\x29\x2b-\x2d\x2f-\x3d\x3f-\x7e]+$")  # printable ASCII but . * >

# Limits on what arrives from the wire (docs/protocol.md, "Limits"). A value from a message
# that the mesh puts into a subject or a key is checked against these first: nats-server
# closes the connection of a client that sends a control line over 4 KiB.
MAX_SUBJECT: Final = 512  # bytes of a subject an agent receives, or a reply target it answers to
MAX_TYPE_NAME: Final = 128
MAX_TOKEN: Final = 128  # a reply token


def agent_name(name: str) -> str:
    """Validate an agent name (it is a subject token and a `$SRV` service name)."""
    if not _AGENT_NAME.match(name):
        raise ConfigError(
            f"agent name {name!r} is not valid: use 1-64 characters of a-z, 0-9, '-' or '_', "
            f"starting with a letter or digit, e.g. 'triage'"
        )
    return name


def is_agent_name(name: str) -> bool:
    return _AGENT_NAME.match(name) is not None


def is_reply_target(subject: str) -> bool:
    """Where an agent may send an answer: a mesh agent/reply/event subject or an _INBOX."""
    if len(subject) > MAX_SUBJECT:
        return False
    if subject.startswith("_INBOX.") and "*" not in subject and ">" not in subject:
        return _TOKEN_CHARS.match(subject.replace(".", "_")) is not None
    address = parse(subject)
    return (
        address is not None
        and address.kind in (AGENT, DIRECT, REPLY, EVENT)
        and is_conversation_id(address.conversation)
        and len(address.target) <= MAX_TYPE_NAME
        and all(t and _TOKEN_CHARS.match(t) for t in address.target.split("."))
    )


def is_conversation_id(value: str) -> bool:
    return _CONVERSATION.match(value) is not None


def conversation_id(value: str) -> str:
    """Validate a conversation id (a single subject token)."""
    if not _CONVERSATION.match(value):
        raise ConfigError(
            f"conversation id {value!r} is not valid: use 1-128 characters of A-Z, a-z, 0-9, "
            f"'-' or '_' (a UUID or an upstream ticket number works)"
        )
    return value


class Address(msgspec.Struct, frozen=True):
    """Where a message goes: the kind of subject, its conversation and its target."""

    kind: Kind
    conversation: str
    target: str  # a type name, an agent name, a reply token

    @property
    def subject(self) -> str:
        return f"{ROOT}.{self.conversation}.{self.kind}.{self.target}"

    @property
    def receiver(self) -> str:
        """Human label of the receiving end, as `mesh tap` shows it."""
        if self.kind == AGENT:
            return self.target
        if self.kind == DIRECT:
            return f"{self.target}!"
        if self.kind in (EVENT, LIVE):
            return f"{self.kind}:{self.target}"
        return f"{self.kind}:{self.target}"

    @classmethod
    def event(cls, conversation: str, type_name: str) -> Address:
        return cls(EVENT, conversation, type_name)

    @classmethod
    def live(cls, conversation: str, type_name: str) -> Address:
        """A live-only event: whoever listens now sees it; nothing stores it."""
        return cls(LIVE, conversation, type_name)

    @classmethod
    def cancel(cls, conversation: str) -> Address:
        """Stop a conversation: every agent process cancels its running handlers of it."""
        return cls(CANCEL, conversation, "all")

    @classmethod
    def inbox(cls, conversation: str, agent: str) -> Address:
        return cls(AGENT, conversation, agent)

    @classmethod
    def direct(cls, conversation: str, agent: str) -> Address:
        return cls(DIRECT, conversation, agent)

    @classmethod
    def reply(cls, conversation: str, token: str) -> Address:
        return cls(REPLY, conversation, token)

    @classmethod
    def timer(cls, conversation: str, agent: str) -> Address:
        return cls(TIMER, conversation, agent)

    @classmethod
    def dead_letter(cls, conversation: str, agent: str) -> Address:
        return cls(DEAD_LETTER, conversation, agent)


def parse(subject: str) -> Address | None:
    """Parse a mesh subject; None if it is not one."""
    parts = subject.split(".", 3)
    if len(parts) != 4 or parts[0] != ROOT or parts[2] not in _KINDS:
        return None
    return Address(parts[2], parts[1], parts[3])  # type: ignore[arg-type]


def event_pattern(type_name: str) -> str:
    """Every event of one type, in any conversation."""
    return f"{ROOT}.*.{EVENT}.{type_name}"


def inbox_pattern(agent: str) -> str:
    """An agent's inbox, in any conversation."""
    return f"{ROOT}.*.{AGENT}.{agent}"


def direct_pattern(agent: str) -> str:
    """An agent's direct line, in any conversation."""
    return f"{ROOT}.*.{DIRECT}.{agent}"


def conversation_pattern(conversation: str) -> str:
    """Everything in one conversation."""
    return f"{ROOT}.{conversation_id(conversation)}.>"


def timer_pattern(agent: str) -> str:
    """An agent's timers, in any conversation."""
    return f"{ROOT}.*.{TIMER}.{agent}"


def cancel_pattern() -> str:
    """Every conversation's cancellations."""
    return f"{ROOT}.*.{CANCEL}.*"


def dead_letter_pattern() -> str:
    """Every dead letter."""
    return f"{ROOT}.*.{DEAD_LETTER}.>"


ALL: Final = f"{ROOT}.>"

AUDIT_ROOT: Final = "mesh_audit"


def audit_subject(writer: str, instance: str) -> str:
    """Where one process (`instance`) of identity `writer` appends its audit records."""
    if not is_agent_name(writer) or not is_conversation_id(instance):
        raise ConfigError(f"audit writer {writer!r}/{instance!r} is not an agent name and a token")
    return f"{AUDIT_ROOT}.{writer}.{instance}"


def audit_pattern(writer: str = "*") -> str:
    """Every audit record of `writer` (every writer by default)."""
    return f"{AUDIT_ROOT}.{writer}.*"


CANCELLED_ROOT: Final = "mesh_cancelled"


def cancelled_subject(conversation: str) -> str:
    """Where a conversation's cancellation is kept (MESH_CANCELS), for processes started later."""
    if not is_conversation_id(conversation):
        raise ConfigError(f"cancellation of {conversation!r}: not a conversation id")
    return f"{CANCELLED_ROOT}.{conversation}"


RECORD_ROOT: Final = "mesh_record"


def record_subject(conversation: str, writer: str) -> str:
    """Where process identity `writer` records what it sent and received in a conversation."""
    if not is_conversation_id(conversation) or not is_agent_name(writer):
        raise ConfigError(f"record of {conversation!r} by {writer!r}: not a conversation id and a name")
    return f"{RECORD_ROOT}.{conversation}.{writer}"


def record_pattern(conversation: str = "*", writer: str = "*") -> str:
    """The record of one conversation (every conversation by default), by `writer` (anyone)."""
    return f"{RECORD_ROOT}.{conversation}.{writer}"


def matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (``*`` one token, ``>`` one or more) matches a subject."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, tok in enumerate(wanted):
        if tok == ">":
            return len(tokens) > i
        if i >= len(tokens) or tok not in ("*", tokens[i]):
            return False
    return len(wanted) == len(tokens)


def check_pattern(pattern: str) -> str:
    """Validate a subscription pattern given by a user (e.g. to `mesh tap`)."""
    tokens = pattern.split(".")
    for i, tok in enumerate(tokens):
        if tok == ">" and i == len(tokens) - 1:
            continue
        if tok == "*":
            continue
        if not tok or not _TOKEN_CHARS.match(tok):
            raise ConfigError(
                f"subject pattern {pattern!r} is not valid: tokens are separated by '.', "
                f"'*' matches one token and '>' (last only) matches the rest, e.g. 'mesh.*.evt.>'"
            )
    return pattern
