"""The loop guard: agents passing the same message back and forth are stopped after a few
rounds, not only once the hop count runs out (MESH_MAX_HOPS).

Each message a handler receives has a *shape*: a short digest of its type, its sender, its
receiver and its body (as decoded and encoded again, so spacing and key order do not count).
Every message carries, in the ``Mesh-Shapes`` header, the shapes of the messages that led to
it: the chain of causes, most recent last, at most `TRAIL` of them. A handler's sends carry
the trail it received plus the shape of the message in hand. When a message's own shape is
already in its trail ``MESH_LOOP_REPEATS`` times, it is dead-lettered as ``loop_detected``
instead of being handled.

The trail rides on the messages rather than in a shared counter: nothing to read or write per
message, and only what caused a message counts against it. A person who asks the same
question three times in one conversation starts three chains, and is not a loop; a chain of
agents whose bodies differ at each step is not either, however long it is. A loop longer than
`TRAIL` messages is still stopped by MESH_MAX_HOPS. An agent's code may leave the header out:
this guards against mistakes, not against a hostile agent.

`loop_guard` is the handler middleware that checks and remembers; `carry_trail` the publish
middleware that puts the trail on what the handler sends.
"""

from __future__ import annotations

import contextvars
import hashlib
import re
from typing import Any, Final

import msgspec

from mesh.middleware.base import Call
from mesh.middleware.publish import Outgoing, Send
from mesh.wire.errors import DeliveryError

HEADER: Final = "Mesh-Shapes"
TRAIL: Final = 32  # shapes kept in the header: 32 * 13 bytes at most
_SHAPE = re.compile(r"^[0-9a-f]{12}$")
_trail: contextvars.ContextVar[str] = contextvars.ContextVar("mesh_loop_trail", default="")


def shape(type_name: str, sender: str, receiver: str, body: bytes) -> str:
    """The digest of one message's shape: 48 bits, as 12 hex characters."""
    # each name after its length, so no two different triples of names read the same
    head = f"{len(type_name)}:{type_name}{len(sender)}:{sender}{len(receiver)}:{receiver}".encode()
    return hashlib.blake2b(head + body, digest_size=6).hexdigest()


def trail_of(headers: dict[str, str]) -> list[str]:
    """The shapes a message's header lists; anything that is not one is left out."""
    raw = headers.get(HEADER)
    if not raw:
        return []
    raw = raw[: TRAIL * 14]
    return [s for s in raw.split(",") if _SHAPE.match(s)][-TRAIL:]


def loop_guard(call_next: Call) -> Call:
    """Middleware: refuse a message whose shape came back too often in its chain (DeliveryError
    ``loop_detected``: dead-lettered, never retried); remember the trail for what it sends."""

    async def call(ctx: Any, msg: Any) -> Any:
        settings = ctx.settings
        repeats = settings.loop_repeats if settings is not None else 0
        if not repeats:
            return await call_next(ctx, msg)
        try:
            body = msgspec.json.encode(msg)
        except (TypeError, msgspec.EncodeError):  # nothing to compare it by: not guarded
            return await call_next(ctx, msg)
        env = ctx.envelope
        mine = shape(env.type_name, ctx.sender, ctx.agent, body)
        trail = trail_of(env.headers)
        seen = trail.count(mine)
        if seen >= repeats:
            raise DeliveryError(
                "loop_detected",
                f"{env.type_name} from {ctx.sender!r} to {ctx.agent!r} with the same body came back "
                f"{seen} times in this chain of messages (MESH_LOOP_REPEATS={repeats}): agents are "
                "passing it around in a loop",
            )
        token = _trail.set(",".join([*trail, mine][-TRAIL:]))
        try:
            return await call_next(ctx, msg)
        finally:
            _trail.reset(token)

    return call


def carry_trail(call_next: Send) -> Send:
    """Publish middleware: what a handler sends carries its trail (nothing outside a handler)."""

    async def send(out: Outgoing) -> Any:
        trail = _trail.get()
        if trail:
            out.headers[HEADER] = trail
        return await call_next(out)

    return send
