"""nats-py's client as the mesh uses it: a subject that is not UTF-8 must not end the
read loop, header values come back as text, and what goes out is sized as the server
counts it."""

from __future__ import annotations

from collections.abc import Mapping
from email.header import Header, decode_header
from typing import Any, Final

from nats.aio.client import Client as NatsClient

MAX_CONTROL_LINE: Final = 4096  # nats-server's default; a longer PUB line closes the connection


class Client(NatsClient):
    """nats-py's client, except that a subject that is not UTF-8 is read as text with its
    bad bytes escaped (``\\xff``). nats-py decodes subjects strictly, and the error ends its
    read loop for good: one such message would leave every replica it reaches connected
    and deaf. Escaped, the subject is no mesh subject, and the agent dead-letters it."""

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
