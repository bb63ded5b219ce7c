"""Message types: typed msgspec structs with a stable wire name and version.

Declare one with the `message` decorator::

    @message("support.ticket_opened", version=1)
    class TicketOpened(Message):
        ticket_id: str
        body: str

Evolve it the msgspec way: add fields with defaults, never change a field's type or
remove a required field. A breaking change is a new version (a new class).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import msgspec

from mesh.wire.errors import RegistrationError, UnknownTypeError

_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """Base class of every message that travels on the mesh."""

    __mesh_type__: ClassVar[MessageType]


@dataclass(frozen=True, slots=True)
class MessageType:
    """The wire identity of a message class: a dotted name and an integer version."""

    name: str
    version: int
    cls: type[Message]

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


M = TypeVar("M", bound=type[Message])


class TypeRegistry:
    """Maps wire names and versions to message classes."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], MessageType] = {}
        self._latest: dict[str, MessageType] = {}

    def add(self, mtype: MessageType) -> None:
        key = (mtype.name, mtype.version)
        existing = self._by_key.get(key)
        if existing is not None and existing.cls is not mtype.cls:
            if existing.cls.__qualname__ == mtype.cls.__qualname__ and _same_source(existing.cls, mtype.cls):
                pass  # one file imported under two module names (by path and by name); keep the first
            else:
                raise RegistrationError(
                    f"message type {mtype} is declared twice: by "
                    f"{existing.cls.__module__}.{existing.cls.__qualname__} and by "
                    f"{mtype.cls.__module__}.{mtype.cls.__qualname__}; give one a new name"
                )
            return
        self._by_key[key] = mtype
        latest = self._latest.get(mtype.name)
        if latest is None or latest.version < mtype.version:
            self._latest[mtype.name] = mtype

    def get(self, name: str, version: int | None = None) -> MessageType:
        found = self._latest.get(name) if version is None else self._by_key.get((name, version))
        if found is None:
            known = ", ".join(sorted(self._latest)) or "none"
            what = name if version is None else f"{name}@{version}"
            raise UnknownTypeError("unknown_type", f"unknown message type {what!r} (known: {known})")
        return found

    def __iter__(self) -> Iterator[MessageType]:
        return iter(sorted(self._by_key.values(), key=lambda t: (t.name, t.version)))

    def __contains__(self, name: object) -> bool:
        return name in self._latest


def _same_source(a: type, b: type) -> bool:
    if a.__module__ == b.__module__:
        return True
    fa = getattr(sys.modules.get(a.__module__), "__file__", None)
    fb = getattr(sys.modules.get(b.__module__), "__file__", None)
    return fa is not None and fb is not None and os.path.realpath(fa) == os.path.realpath(fb)


registry = TypeRegistry()
"""Every message type declared in this process."""


def is_type_name(name: str) -> bool:
    """Lower-case dotted words with a domain first, e.g. ``support.ticket_opened``."""
    return _TYPE_NAME.match(name) is not None


def message(name: str, *, version: int = 1) -> Callable[[M], M]:
    """Give a `Message` subclass its stable wire name and version, and register it."""
    if not is_type_name(name):
        raise RegistrationError(
            f"message type name {name!r} is not valid: use lower-case dotted words "
            f"with a domain first, e.g. 'support.ticket_opened'"
        )
    if version < 1:
        raise RegistrationError(f"message type {name!r}: version must be >= 1, got {version}")

    def register(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Message)):
            raise RegistrationError(
                f"@message({name!r}) decorates {cls!r}, which is not a mesh.Message subclass; "
                f"write `class {getattr(cls, '__name__', 'X')}(mesh.Message): ...`"
            )
        mtype = MessageType(name=name, version=version, cls=cls)
        cls.__mesh_type__ = mtype
        registry.add(mtype)
        return cls

    return register


def type_of(cls: type[Message]) -> MessageType:
    """The wire identity of a message class; a clear error if it was never declared."""
    mtype = cls.__dict__.get("__mesh_type__")
    if mtype is None:
        raise RegistrationError(
            f"{cls.__module__}.{cls.__qualname__} has no wire name: decorate it with "
            f"@mesh.message('domain.name', version=1)"
        )
    return mtype  # type: ignore[no-any-return]
