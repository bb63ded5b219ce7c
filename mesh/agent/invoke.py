"""The innermost call of a handler's middleware chain: run it, and send what it returns
as the reply."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from mesh.middleware.base import Call
from mesh.wire.messages import Message

if TYPE_CHECKING:
    from mesh.agent.context import Context
    from mesh.agent.declaration import Handler
    from mesh.join import Join


def handler_call(handler: Handler) -> Call:
    return _calling(handler.fn, handler.takes_context, f"handler {handler.name}")


def join_call(join: Join[Any]) -> Call:
    assert join.handler is not None
    return _calling(join.handler, join.takes_context, f"join {join.name}")


def _calling(fn: Callable[..., Awaitable[Any]], with_ctx: bool, what: str) -> Call:
    async def invoke(ctx: Context, arg: Any) -> Message | None:
        result: object = await (fn(arg, ctx) if with_ctx else fn(arg))
        if isinstance(result, Message):
            await ctx.reply(result)
        elif result is not None:
            raise TypeError(
                f"{what} returned {type(result).__name__}; return a mesh.Message (sent as the reply) or None"
            )
        return None

    return invoke
