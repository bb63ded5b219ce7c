"""What a replay found (mesh.agent.replay): the messages the tested agents sent then and
now, compared one by one, and the report `mesh replay` prints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from mesh.observability import history
from mesh.wire import envelope as h

CLOCK_FIELDS: Final = frozenset({"expires_ms", "due_ms"})  # set by the mesh from the clock
_ROUTING: Final = (h.REPLY_TO, h.ROUTE, h.JOIN, h.ANSWER)


class Difference(msgspec.Struct, frozen=True):
    """One way the replay differs from the recording."""

    change: str  # missing, extra, type, routing, field, unsettled
    agent: str
    message: str  # its id
    type: str
    path: str = ""  # a field's path, or a header's name for routing
    recorded: Any = None
    replayed: Any = None

    def line(self) -> str:
        where = f"{self.agent} {self.type} {self.message}"
        if self.change == "missing":
            return f"- {where}: recorded, not sent by the new version"
        if self.change == "extra":
            return f"+ {where}: sent by the new version, not in the recording"
        if self.change == "unsettled":
            return f"! {where}: the new version did not settle this input in time"
        return f"~ {where}: {self.path}: {_show(self.recorded)} → {_show(self.replayed)}"


@dataclass(slots=True)
class Report:
    """What a replay found."""

    conversation: str
    agents: tuple[str, ...]
    inputs: int
    recorded: int  # messages the tested agents sent in the recording
    replayed: int  # and in the replay
    differences: list[Difference] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not self.differences

    def render(self) -> str:
        head = (
            f"replayed conversation {self.conversation} through {', '.join(self.agents)}: "
            f"{self.inputs} inputs, {self.recorded} messages recorded, {self.replayed} sent"
        )
        body = [d.line() for d in self.differences] or ["no differences"]
        return "\n".join([head, *body, *(f"note: {n}" for n in self.notes)])

    def assert_same(self) -> None:
        """Fail (AssertionError with the differences) unless the replay matched."""
        if not self.same:
            raise AssertionError(self.render())

    def to_dict(self) -> dict[str, Any]:
        return {
            "conversation": self.conversation,
            "agents": list(self.agents),
            "inputs": self.inputs,
            "recorded": self.recorded,
            "replayed": self.replayed,
            "same": self.same,
            "differences": [msgspec.to_builtins(d) for d in self.differences],
            "notes": self.notes,
        }


def compare(
    recorded: list[history.Recorded], replayed: list[history.Recorded], ignore: frozenset[str]
) -> list[Difference]:
    """The differences between what the tested agents sent then and now, message by message:
    matched by their slot (who sent it, handling which message, as its how-many-th send), so
    a message matches its counterpart even where its id is not derived (a request's)."""
    then = {m.slot: m for m in recorded}
    now = {m.slot: m for m in replayed}
    out: list[Difference] = []
    for m in then.values():
        got = now.get(m.slot)
        if got is None:
            out.append(Difference("missing", m.sent_by, m.id, m.type))
            continue
        if got.type != m.type or got.headers.get(h.VERSION) != m.headers.get(h.VERSION):
            out.append(Difference("type", m.sent_by, m.id, m.type, "type", _typed(m), _typed(got)))
            continue
        for name, a, b in [("subject", _where(m.subject), _where(got.subject))] + [
            (k, _where(m.headers.get(k, "")), _where(got.headers.get(k, ""))) for k in _ROUTING
        ]:
            if a != b:
                out.append(Difference("routing", m.sent_by, m.id, m.type, name, a, b))
        for path, a, b in _fields(m.body(), got.body(), "", ignore):
            out.append(Difference("field", m.sent_by, m.id, m.type, path, a, b))
    out += [Difference("extra", m.sent_by, m.id, m.type) for m in now.values() if m.slot not in then]
    return out


def _typed(m: history.Recorded) -> str:
    return f"{m.type}@{m.headers.get(h.VERSION, '?')}"


def _where(subject: str) -> str:
    """A subject as compared: a requester's own inbox differs in every run."""
    return "(the requester's inbox)" if subject.startswith("_INBOX.") else subject


def _fields(a: Any, b: Any, path: str, ignore: frozenset[str]) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if key in ignore:
                continue
            sub = f"{path}.{key}" if path else str(key)
            if key not in b or key not in a:
                out.append((sub, a.get(key, "(absent)"), b.get(key, "(absent)")))
            else:
                out += _fields(a[key], b[key], sub, ignore)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in _fields(x, y, f"{path}[{i}]", ignore)
        ]
    return [] if a == b else [(path or "(body)", a, b)]


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
