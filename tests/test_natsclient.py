"""The mesh's nats-py client writes and reads headers in one pass each: byte for byte and
key for key what nats-py's own code does, for the values the wire can bring."""

from __future__ import annotations

import random
from typing import Any

import pytest
from nats import errors
from nats.aio.client import Client as NatsClient
from nats.js.api import Header

from mesh.transport.natsclient import Client, header_block, parse_header_lines

VALUES = [
    "support.ticket_opened",
    "3RQck3RpF6bJ6uLfTvblB0",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "",
    "  padded  ",
    "tab\tinside",
    "line\r\nbreak",
    "lone\rcarriage",
    "lone\nfeed",
    "Zahlung für Kunde 4 fehlgeschlagen",
    "colon: inside: it",
    "\u2003em spaces\u2003",
    "trailing nel\x85",
    "🦊",
]
# nats-py's own names are str Enum members (a KV update's compare-and-set header)
NAMES: list[str] = ["Mesh-Type", "Nats-Msg-Id", "traceparent", "X_odd.name~1", "a", *Header]


class Captured:
    """A client that keeps what it would write instead of writing it."""

    def __init__(self, cls: type[NatsClient]) -> None:
        self.client = cls()
        self.client._flush_queue = None  # type: ignore[assignment]
        self.written: list[bytes] = []

        async def send(cmd: bytes, priority: bool = False) -> None:
            self.written.append(cmd)

        self.client._send_command = send  # type: ignore[method-assign]

    async def publish(self, headers: dict[str, str]) -> bytes:
        await self.client._send_publish("mesh.c.evt.a.b", "_INBOX.x", b"{}", 2, headers)
        return self.written.pop()


def cases() -> list[dict[str, str]]:
    rng = random.Random(11)
    out = [dict(zip(NAMES, VALUES, strict=False)), *({"Mesh-Type": v} for v in VALUES)]
    for _ in range(200):
        out.append({rng.choice(NAMES): rng.choice(VALUES) for _ in range(rng.randrange(1, 12))})
    return out


async def test_headers_are_written_as_nats_py_writes_them() -> None:
    ours, theirs = Captured(Client), Captured(NatsClient)
    for headers in cases():
        assert await ours.publish(headers) == await theirs.publish(headers), headers


@pytest.mark.parametrize("name", ["", " Mesh-Type", "Mesh Type", "Mesh-Typé", "Mesh:Type"])
async def test_a_name_nats_py_would_change_or_refuse_is_left_to_nats_py(name: str) -> None:
    assert header_block({name: "x"}) is None
    ours, theirs = Captured(Client), Captured(NatsClient)
    try:
        expected: Any = await theirs.publish({name: "x"})
    except errors.BadHeaderError as exc:
        expected = type(exc)
    try:
        got: Any = await ours.publish({name: "x"})
    except errors.BadHeaderError as exc:
        got = type(exc)
    assert got == expected


RAW_LINES = [
    b"Mesh-Type: support.ticket_opened",
    b"Mesh-Id:no-space",
    b"Mesh-Hop:\t7 ",
    b"  Padded-Name  : value",
    b"Bad Name: skipped",
    b"N\xc3\xa4me: not ascii, skipped",
    b"Mesh-Sender: Zahlung f\xc3\xbcr Kunde",
    b"Mesh-Reason: not utf-8 \xff here",
    b"no colon at all",
    b"",
    b"Mesh-Type: the second one wins",
    b"Mesh-Route: a,b:c",
    b"Mesh-Odd: \xe2\x80\x83em space kept\xe2\x80\x83",
    b"Mesh-Empty:",
    b"\x1cMesh-Sep: separator in the name",
]


def test_headers_are_read_as_nats_py_reads_them() -> None:
    rng = random.Random(5)
    blocks = [b"\r\n".join(RAW_LINES) + b"\r\n\r\n"]
    for _ in range(300):
        blocks.append(b"\r\n".join(rng.sample(RAW_LINES, rng.randrange(1, len(RAW_LINES)))) + b"\r\n\r\n")
    for raw in blocks:
        assert parse_header_lines(raw) == NatsClient._parse_header_lines(raw), raw
