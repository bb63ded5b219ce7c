"""Reading a stream's stored messages in batches: one request for up to `batch` messages.

`Transport.stored_next` asks for one message a request. Reading a conversation's record or
the tail of it for `mesh conversations` takes hundreds, so on NATS they are asked for with
a batched direct get (``next_by_subj`` and ``batch``, nats-server 2.11 and later, on a
stream that allows direct gets): the messages come back one after another to one reply
subject, followed by an end-of-batch status. A server or stream that refuses it is read one
message a request instead.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Final

from mesh.transport.memstreams import Stored
from mesh.transport.natsclient import text_headers

if TYPE_CHECKING:
    from mesh.transport.nats import NatsTransport

_END: Final = "204"  # the end of a batch
_NONE: Final = "404"  # nothing at or after the sequence
_INFO: Final = (
    "Nats-Stream",
    "Nats-Sequence",
    "Nats-Time-Stamp",
    "Nats-Subject",
    "Nats-Num-Pending",
    "Nats-Last-Sequence",
)


class NoBatches(Exception):
    """The server or the stream does not answer batched direct gets."""


async def stored_batch(
    transport: NatsTransport, stream: str, seq: int, subject: str, batch: int, timeout: float = 5.0
) -> list[Any]:
    """Up to `batch` messages stored at or after `seq` on `subject` (a pattern), in order."""
    if stream not in transport.unbatched:
        try:
            return await _batch(transport.nc, transport.new_inbox(), stream, seq, subject, batch, timeout)
        except NoBatches:
            transport.unbatched.add(stream)  # not here: one a request from now on
    one = await transport.stored_next(stream, seq, subject)
    return [one] if one is not None else []


async def _batch(
    nc: Any, inbox: str, stream: str, seq: int, subject: str, batch: int, timeout: float
) -> list[Any]:
    sub = await nc.subscribe(inbox)
    try:
        request = json.dumps({"seq": seq, "next_by_subj": subject, "batch": batch}).encode()
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", request, reply=inbox)
        out: list[Stored] = []
        while True:
            msg = await sub.next_msg(timeout)
            headers = text_headers(msg.headers) or {}
            status = headers.get("Status")
            if status is not None:
                if status in (_END, _NONE):
                    return out
                raise NoBatches(f"{status} {headers.get('Description', '')}".strip())
            kept = {k: v for k, v in headers.items() if k not in _INFO}
            at = headers.get("Nats-Time-Stamp", "")
            out.append(
                Stored(
                    headers.get("Nats-Subject", ""),
                    bytes(msg.data),
                    kept or None,
                    int(headers.get("Nats-Sequence", "0")),
                    _epoch(at),
                )
            )
    finally:
        await sub.unsubscribe()


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of an RFC 3339 time stamp with nanoseconds (0.0 if unreadable)."""
    from datetime import datetime

    if not stamp:
        return 0.0
    head, _, frac = stamp.rstrip("Z").partition(".")
    try:
        whole = datetime.fromisoformat(head + "+00:00").timestamp()
    except ValueError:
        return 0.0
    return whole + (float("0." + frac) if frac.isdigit() else 0.0)


async def stream_bounds(js: Any, stream: str) -> tuple[int, int]:
    """The first and last sequence `stream` holds."""
    state = (await js.stream_info(stream)).state
    return int(state.first_seq), int(state.last_seq)
