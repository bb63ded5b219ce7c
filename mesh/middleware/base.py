"""Middleware: a function that takes the next call and returns a call.

    def timing(call_next: Call) -> Call:
        async def call(ctx: Context, msg: Message) -> Message | None:
            started = time.perf_counter()
            try:
                return await call_next(ctx, msg)
            finally:
                ctx.log.info("handled", seconds=time.perf_counter() - started)
        return call

The first middleware in a list is the outermost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from mesh.wire.messages import Message

if TYPE_CHECKING:
    from mesh.agent.context import Context

Call = Callable[["Context", Message], Awaitable[Message | None]]
Middleware = Callable[[Call], Call]


def chain(core: Call, middleware: Sequence[Middleware]) -> Call:
    """Wrap `core` so that ``middleware[0]`` runs first."""
    call = core
    for mw in reversed(middleware):
        call = mw(call)
    return call
