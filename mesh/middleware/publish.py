"""Publish-side middleware: what happens to every message on its way out.

Handler middleware (`mesh.middleware.base`) wraps the handling of a message coming in. A
publish middleware wraps the sending of one going out, after the mesh has written its
headers and before the transport has it: it can add headers (the trace context, later a
signature), record the message, or refuse it by raising.

    def stamp(call_next: Send) -> Send:
        async def send(out: Outgoing) -> Any:
            out.headers["X-Origin"] = "billing"
            return await call_next(out)
        return send

The first middleware in a list is the outermost. Every message a `MeshClient` sends goes
through its chain: stored ones (inboxes, events, timers), plain publishes (direct lines,
replies) and requests; `Outgoing.kind` says which.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mesh.transport.outbox import Outbox

Kind = Literal["store", "publish", "request"]

STORE: Kind = "store"  # JetStream: the stream acknowledges it
PUBLISH: Kind = "publish"  # core NATS, at most once
REQUEST: Kind = "request"  # core NATS, and the first answer comes back


@dataclass(slots=True)
class Outgoing:
    """One message on its way to the transport. Middleware may change the headers."""

    subject: str
    data: bytes
    headers: dict[str, str]
    kind: Kind
    timeout: float = 0.0  # a request's
    # a store made by a handler: published at once, acknowledged when the runtime flushes
    # the run's outbox (mesh.transport.outbox); None: acknowledged before the send returns
    outbox: Outbox | None = None


Send = Callable[[Outgoing], Awaitable[Any]]
PublishMiddleware = Callable[[Send], Send]


def chain_publish(last: Send, middleware: Sequence[PublishMiddleware]) -> Send:
    """Wrap `last` (the transport's send) so that ``middleware[0]`` runs first."""
    send = last
    for mw in reversed(middleware):
        send = mw(send)
    return send
