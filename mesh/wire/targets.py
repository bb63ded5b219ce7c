"""Turning what a user types (`mesh publish TARGET BODY`) into an address and a valid message."""

from __future__ import annotations

import msgspec

from mesh.wire import subjects
from mesh.wire.envelope import new_id
from mesh.wire.errors import ConfigError, UnknownTypeError
from mesh.wire.messages import Message, MessageType, registry


def lookup(name: str, version: int | None = None) -> MessageType:
    try:
        return registry.get(name, version)
    except UnknownTypeError as exc:
        raise ConfigError(
            f"{exc.reason}; `mesh schema` lists them. Types declared in your own modules need "
            f"--types MODULE (or MESH_TYPES=module,file.py)"
        ) from None


def parse_target(
    target: str, type_name: str | None, conversation: str | None
) -> tuple[subjects.Address, MessageType]:
    """`support.ticket_opened`, `agent:triage` (with a type) or a full mesh subject."""
    conv = subjects.conversation_id(conversation) if conversation else new_id()
    if target.startswith("agent:"):
        if not type_name:
            raise ConfigError(f"sending to {target} needs the message type: add --type <type name>")
        return subjects.Address.inbox(conv, subjects.agent_name(target[6:])), lookup(type_name)
    if target.startswith(subjects.ROOT + "."):
        address = subjects.parse(target)
        if address is None or address.kind not in (subjects.EVENT, subjects.AGENT):
            raise ConfigError(
                f"{target!r} is not a mesh event or inbox subject: use mesh.<conversation>.evt.<type> "
                f"or mesh.<conversation>.agent.<agent>"
            )
        if address.kind == subjects.EVENT:
            if type_name and type_name != address.target:
                raise ConfigError(f"--type {type_name} does not match the subject's type {address.target}")
            return address, lookup(address.target)
        if not type_name:
            raise ConfigError("sending to an agent inbox needs the message type: add --type <type name>")
        return address, lookup(type_name)
    if type_name and type_name != target:
        raise ConfigError(f"--type {type_name} does not match TARGET {target}")
    return subjects.Address.event(conv, lookup(target).name), lookup(target)


def validate_body(body: str, mtype: MessageType) -> Message:
    """Decode and validate JSON text as `mtype`; ConfigError says what is wrong and where."""
    try:
        return msgspec.json.decode(body.encode(), type=mtype.cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"the body is not a valid {mtype}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"the body is not valid JSON: {exc}") from None
