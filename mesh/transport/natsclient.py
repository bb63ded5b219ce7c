"""nats-py's client as the mesh uses it: a subject that is not UTF-8 must not end the
read loop, header values come back as text, headers are written and read in one pass, and
what goes out is sized as the server counts it."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Mapping
from email.header import Header, decode_header
from typing import Any, Final

from nats import errors
from nats.aio.client import Client as NatsClient
from nats.protocol import command

from mesh.wire.errors import ServerError
from mesh.wire.settings import Settings

MAX_CONTROL_LINE: Final = 4096  # nats-server's default; a longer PUB line closes the connection

_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a header name nats-py writes as is
_NEWLINES: Final = str.maketrans({"\r": " ", "\n": " "})
_ASCII_SPACE: Final = " \t\n\r\x0b\x0c"  # what bytes.strip() takes off
_KNOWN: set[str] = set()  # header names checked once: written (or read) as they are
_KNOWN_MAX: Final = 4096  # names from the wire are not kept past this many


def header_block(headers: Mapping[str, str]) -> bytes | None:
    """The ``NATS/1.0`` header block of `headers`, byte for byte what nats-py writes (values
    trimmed, CR and LF made spaces), built in one pass: nats-py checks each name with a
    regular expression and encodes it piece by piece on every publish, which cost more than
    a quarter of a mesh message's publish. None if a name is not one nats-py writes as is
    (an empty or untrimmed one: nats-py's own path decides)."""
    lines = ["NATS/1.0\r\n"]
    for name, value in headers.items():
        if name not in _KNOWN:
            if not _NAME.fullmatch(name):
                return None
            if len(_KNOWN) < _KNOWN_MAX:
                _KNOWN.add(name)
        if "\r" in value or "\n" in value:
            value = value.translate(_NEWLINES)
        # concatenated, not formatted: nats-py's own names are str Enum members (a KV
        # update's Nats-Expected-Last-Subject-Sequence), which a format string would write
        # by their Enum name
        lines.append(name + ": " + value.strip() + "\r\n")
    lines.append("\r\n")
    return "".join(lines).encode()


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's `_parse_header_lines` (after the ``NATS/1.0`` line: ``Name: Value`` lines),
    with the same result, in one decode of the block instead of two per line."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:  # a value that is not UTF-8: nats-py's way, line by line
        return NatsClient._parse_header_lines(raw)
    out: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            continue
        if name not in _KNOWN:
            if not name.isascii():
                continue  # nats-py skips a name that is not ASCII
            name = name.strip(_ASCII_SPACE)
            if any(c.isspace() for c in name):
                continue  # nor one with whitespace inside
            if len(_KNOWN) < _KNOWN_MAX and _NAME.fullmatch(name):
                _KNOWN.add(name)
        out[name] = value.strip(_ASCII_SPACE)
    return out


class Client(NatsClient):
    """nats-py's client, except that a subject that is not UTF-8 is read as text with its
    bad bytes escaped (``\\xff``). nats-py decodes subjects strictly, and the error ends its
    read loop for good: one such message would leave every replica it reaches connected
    and deaf. Escaped, the subject is no mesh subject, and the agent dead-letters it."""

    _parse_header_lines = staticmethod(parse_header_lines)

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: Any
    ) -> None:
        block = None if headers is None else header_block(headers)
        if block is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        if subject == "":
            raise errors.BadSubjectError
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(command.hpub_cmd(subject, reply, block, payload))
        if self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def _build_message(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        try:
            return super()._build_message(sid, subject, reply, data, headers)
        except UnicodeDecodeError:
            return self.msg_class(
                subject=subject.decode(errors="backslashreplace"),
                reply=reply.decode(errors="backslashreplace"),
                data=data,
                headers=headers,
                _client=self,
                _sid=sid,
            )


def header_bytes(headers: dict[str, str] | None) -> int:
    """The size of `headers` on the wire (the ``NATS/1.0`` block), exactly."""
    if not headers:
        return 0
    return 12 + sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())


def text_headers(raw: Mapping[str, object] | None) -> dict[str, str]:
    """Header values as text.

    nats-py parses the headers of a message fetched by the JetStream API as e-mail headers,
    which hands a value holding non-ASCII bytes back as an `email.header.Header`. Its bytes
    are read as UTF-8 here, undecodable ones as U+FFFD, as nats-py does on a subscription.
    """
    return {name: _text(value) for name, value in (raw or {}).items()}


def _text(value: object) -> str:
    if isinstance(value, Header):
        parts = decode_header(value)
        return b"".join(
            p if isinstance(p, bytes) else p.encode("utf-8", "surrogateescape") for p, _ in parts
        ).decode("utf-8", "replace")
    return str(value)


def with_text_headers(msg: Any) -> Any:
    msg.headers = text_headers(msg.headers) or None
    return msg


class Refused(Exception):
    """The server refused the connection's credentials (or their absence)."""


async def connect_or_refuse(
    nc: NatsClient, options: dict[str, Any], refused: asyncio.Future[str], timeout: float
) -> None:
    """Connect, failing at once when the server refuses the credentials: nats-py would
    otherwise try again until the timeout."""
    connecting: asyncio.Future[Any] = asyncio.ensure_future(nc.connect(**options))
    await asyncio.wait([connecting, refused], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if connecting.done():
        connecting.result()
        return
    connecting.cancel()
    with contextlib.suppress(BaseException):
        await connecting
    if not refused.done():
        raise TimeoutError
    with contextlib.suppress(Exception):
        await nc.close()
    raise Refused(refused.result())


def is_refusal(exc: Exception) -> bool:
    """The server refused this client's credentials, or this client the server's certificate:
    trying again will not help (beyond a reload racing the connect)."""
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text or _TLS_REFUSAL in text


_TLS_REFUSAL: Final = "certificate verify failed"


def refused_by(reason: str, shown: str, settings: Settings) -> ServerError:
    """What to say when the server at `shown` and this process did not accept each other."""
    if _TLS_REFUSAL in reason.lower():
        trusted = f"the CA in {settings.nats_tls_ca}" if settings.nats_tls_ca else "the system's trust store"
        return ServerError(
            f"NATS at {shown} presented a TLS certificate that {trusted} does not verify ({reason}): set "
            f"MESH_NATS_TLS_CA to the CA that issued it, and connect by the name the certificate is for"
        )
    who = f"the credentials in {settings.nats_creds}" if settings.nats_creds else "a client without any"
    return ServerError(
        f"NATS at {shown} refused {who} ({reason}): the server requires authentication. Set "
        f"MESH_NATS_CREDS to this process's credentials (`mesh creds`), or, on the machine that "
        f"ran `mesh up`, use the same MESH_DATA_DIR"
    )
