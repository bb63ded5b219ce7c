"""Work of the mesh's own: messages an agent receives that none of its handlers take.

A join's answers and timers, and an approval's decision and timer, arrive on the agent's
inbox (or the timer stream) like any other message. The pattern that sent them keeps their
state and knows what to do with them: a `Keeper`. The runner registers each keeper by the
message classes it takes, and asks the registry before it looks for a handler, so the
runner itself knows nothing of joins or approvals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Protocol

from mesh.transport.delivery import Later
from mesh.wire.errors import RegistrationError
from mesh.wire.messages import Message, type_of

if TYPE_CHECKING:
    from mesh.agent.context import Context
    from mesh.wire.envelope import Envelope

Outcome = Literal["handled", "skipped"]


class Keeper(Protocol):
    """A pattern's receiving end."""

    # the message classes it takes (its timers, decisions); registered by type name
    takes: tuple[type[Message], ...]
    # whether it also takes answers to the fan-outs it started (any type: they are
    # recognised by their `Mesh-Answer` header, not by their class)
    answers: bool

    def owns(self, env: Envelope) -> bool:
        """Whether this message is the keeper's (a registered type can still be foreign:
        an approval decision for an agent without tools, a timer of another kind)."""
        ...

    async def receive(self, env: Envelope, ctx: Context) -> Outcome | Later: ...


class Keepers:
    """The keepers of one agent, by the type names they take."""

    def __init__(self) -> None:
        self._by_type: dict[str, Keeper] = {}
        self._answers: list[Keeper] = []

    def add(self, keeper: Keeper) -> None:
        for cls in keeper.takes:
            name = type_of(cls).name
            if name in self._by_type:
                raise RegistrationError(f"message type {name} already has a keeper")
            self._by_type[name] = keeper
        if keeper.answers:
            self._answers.append(keeper)

    def find(self, env: Envelope) -> Keeper | None:
        """The keeper this message is for, or None (then it is for a handler)."""
        if env.answer:  # an answer to a fan-out is the fan-out's, whatever its type
            for k in self._answers:
                if k.owns(env):
                    return k
        keeper = self._by_type.get(env.type_name)
        return keeper if keeper is not None and keeper.owns(env) else None
