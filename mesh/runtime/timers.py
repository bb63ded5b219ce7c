"""Timers that wait in the timer stream: a join's deadline, an approval's expiry.

A timer is a stored message on ``mesh.<conversation>.timer.<agent>`` that is handed back
(`Later`) until it is due. Each hand-back is a delivery, and the consumer gives up after
MaxDeliver of them, so a timer that is still not due by then is stored again as a fresh
message (re-armed) and the old one acknowledged.

A timer is taken only from the agent itself: one from anyone else (the operator role may
publish on the timer subject, to decide approvals) is refused as ``unauthorized``, so no one
can expire an approval early or close a join before its deadline.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Literal

from mesh.runtime.client import Lineage
from mesh.transport.delivery import Later
from mesh.wire import subjects
from mesh.wire.errors import DeliveryError
from mesh.wire.messages import Message
from mesh.wire.senders import sender_of

if TYPE_CHECKING:
    from mesh.agent.context import Context
    from mesh.wire.envelope import Envelope


async def wait(
    env: Envelope, ctx: Context, timer: Message, due_ms: int, max_deliver: int
) -> Later | Literal["rearmed"] | None:
    """None if the timer `timer` (received as `env`) is due; else how it waits on."""
    if sender_of(env) != ctx.agent:
        raise DeliveryError(
            "unauthorized",
            f"a {env.type_name} timer came from {sender_of(env)!r}: "
            f"{ctx.agent!r} takes timers only from itself",
        )
    left = due_ms / 1000 - time.time()
    if left <= 0:
        return None
    if ctx.attempt < max(2, max_deliver):
        return Later(left)
    lineage = Lineage(
        conversation=env.conversation,
        causation=env.causation,
        hop=env.hop,
        answer=env.answer,
        depth=env.depth,
    )
    await ctx.emit(subjects.Address.timer(env.conversation, ctx.agent), timer, lineage)
    return "rearmed"
