"""A2A message parts to a mesh agent's typed message, and a mesh answer back to parts.

A message to a mesh agent carries one of:

- a ``data`` part: the message's JSON, validated against its type (a field error is a
  JSON-RPC invalid-params error whose ``data.errors`` lists each ``path`` and ``message``);
- ``text`` parts (joined by newlines): accepted when the type has exactly one required
  ``str`` field, which gets the text.

Which type: ``metadata["mesh.type"]`` of the message, else the one type the agent handles.
File parts (``raw``, ``url``) are refused: no mesh message type takes a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import msgspec
from a2a.helpers import get_data_parts, new_data_part, new_text_part
from a2a.types import Message as A2AMessage
from a2a.types import Part
from a2a.utils.errors import InvalidParamsError

from mesh.wire import subjects
from mesh.wire.errors import UnknownTypeError
from mesh.wire.messages import Message, MessageType, is_type_name, registry

MAX_PARTS: Final = 16
TYPE_KEY: Final = "mesh.type"  # the message metadata key naming the mesh message type


def handled_types(handles: Sequence[str]) -> list[MessageType]:
    """The types an agent says it handles (``name@version``) that this gateway declares."""
    found = []
    for entry in handles:
        name, _, version = entry.partition("@")
        try:
            found.append(registry.get(name, int(version) if version.isdigit() else None))
        except UnknownTypeError:
            continue  # handled there, not declared here: the gateway cannot validate it
    return found


def chosen_type(message: A2AMessage, agent: str, types: Sequence[MessageType]) -> MessageType:
    """The type the message is for: the one its metadata names, else the agent's only one."""
    said = message.metadata[TYPE_KEY] if TYPE_KEY in message.metadata else None  # noqa: SIM401 (a Struct)
    names = ", ".join(str(t) for t in types) or "none declared on this gateway"
    if said is not None:
        if not isinstance(said, str) or len(said) > subjects.MAX_TYPE_NAME or not is_type_name(said):
            raise InvalidParamsError(f"metadata {TYPE_KEY!r} is not a message type name")
        for t in types:
            if t.name == said:
                return t
        raise InvalidParamsError(f"agent {agent!r} does not take a {said!r} here; it takes: {names}")
    if not types:
        raise InvalidParamsError(
            f"agent {agent!r} takes no message type declared on this gateway: start the gateway "
            "with --types naming the module that declares them"
        )
    if len(types) != 1:
        raise InvalidParamsError(
            f"agent {agent!r} takes several message types ({names}): "
            f"name one in the message's metadata as {TYPE_KEY!r}"
        )
    return types[0]


def to_message(message: A2AMessage, mtype: MessageType) -> Message:
    """The A2A message's parts as a `mtype`; `InvalidParamsError` saying what to send."""
    parts = list(message.parts)
    if not parts:
        raise InvalidParamsError(f"the message has no parts: send a data part (a {mtype}) or a text part")
    if len(parts) > MAX_PARTS:
        raise InvalidParamsError(f"a message has at most {MAX_PARTS} parts, not {len(parts)}")
    kinds = {p.WhichOneof("content") for p in parts}
    if kinds - {"text", "data"}:
        raise InvalidParamsError(
            f"only text and data parts are taken, not {sorted(kinds - {'text', 'data'})}"
        )
    data = [p for p in parts if p.HasField("data")]
    if len(data) > 1:
        raise InvalidParamsError(f"send one data part (a {mtype}), not {len(data)}")
    if data:
        return _validated(_ints(get_data_parts(data)[0]), mtype)
    field = only_text_field(mtype)
    if field is None:
        raise InvalidParamsError(
            f"a {mtype} is not a single piece of text: send it as a data part with its fields "
            f"({', '.join(_required(mtype)) or 'all optional'})",
            data={"schema": msgspec.json.schema(mtype.cls)},
        )
    return _validated({field: "\n".join(p.text for p in parts)}, mtype)


def _validated(body: Any, mtype: MessageType) -> Message:
    try:
        return msgspec.convert(body, mtype.cls)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, _, path = text.rpartition(" - at `")
        if not message:
            message, path = text, "$`"
        errors = [{"field": path.rstrip("`"), "message": message}]  # as google.rpc.BadRequest
        raise InvalidParamsError(f"not a valid {mtype}: {text}", data={"errors": errors}) from None


def _ints(value: Any) -> Any:
    """A data part's numbers are doubles (protobuf's Value): whole ones back to ints, so an
    ``int`` field takes ``5``; a ``float`` field takes an int as well."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


def _required(mtype: MessageType) -> list[str]:
    info = msgspec.inspect.type_info(mtype.cls)
    assert isinstance(info, msgspec.inspect.StructType)
    return [f.encode_name for f in info.fields if f.required]


def only_text_field(mtype: MessageType) -> str | None:
    info = msgspec.inspect.type_info(mtype.cls)
    assert isinstance(info, msgspec.inspect.StructType)
    required = [f for f in info.fields if f.required]
    if len(required) == 1 and isinstance(required[0].type, msgspec.inspect.StrType):
        return required[0].encode_name
    return None


def describe(mtype: MessageType) -> str:
    """A skill's description: the type's docstring, its fields, and how to send it."""
    info = msgspec.inspect.type_info(mtype.cls)
    assert isinstance(info, msgspec.inspect.StructType)
    fields = ", ".join(f"{f.encode_name}{'' if f.required else ' (optional)'}" for f in info.fields)
    doc = " ".join((mtype.cls.__doc__ or "").split())
    how = "a data part with its fields" + (" or a text part" if only_text_field(mtype) is not None else "")
    return f"{doc + ' ' if doc else ''}A {mtype} message ({fields}); send {how}."


def answer_parts(body: Any) -> list[Part]:
    """A mesh answer's body as parts: text as a text part, anything else as a data part."""
    if isinstance(body, str):
        return [new_text_part(body)]
    return [new_data_part(body)]
