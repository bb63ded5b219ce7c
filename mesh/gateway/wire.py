"""What the gateway takes from HTTP, checked before it reaches the mesh: path values, the
Idempotency-Key, timeouts and bodies. Each check raises `Refused` with its HTTP status."""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any, Final

import msgspec
from opentelemetry import propagate
from opentelemetry.context import Context
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from mesh.gateway.auth import SIGNATURE_HEADER, TIMESTAMPED_HEADER, signature_parts
from mesh.wire import subjects
from mesh.wire.errors import ConfigError, UnknownTypeError
from mesh.wire.messages import Message, MessageType, is_type_name, registry

MAX_KEY: Final = 128
MAX_TIMEOUT: Final = 60.0
_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class Slots:
    """A count of long requests (event streams) with a limit; a slot is taken when the
    request is accepted, before its response starts, so a burst cannot pass the limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.taken = 0

    def take(self) -> bool:
        if self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def give_back(self) -> None:
        self.taken -= 1


class HeldStream(StreamingResponse):
    """A streamed response that gives its slot back when it ends, however it ends (the
    client gone, the stream never started, an error)."""

    def __init__(self, content: AsyncIterator[bytes], slots: Slots) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )
        self._slots: Slots | None = slots

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._slots is not None:
                self._slots.give_back()
                self._slots = None


class Refused(Exception):
    """A request the gateway answers with `status` and a JSON error body."""

    def __init__(self, status: int, error: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.body: dict[str, Any] = {"error": error, "detail": detail, **extra}


def agent(name: str) -> str:
    try:
        return subjects.agent_name(name)
    except ConfigError as exc:
        raise Refused(400, "invalid_agent", str(exc)) from None


def conversation(value: str) -> str:
    if not subjects.is_conversation_id(value):
        raise Refused(400, "invalid_conversation", "a conversation id is 1-128 of A-Z a-z 0-9 - _")
    return value


def message_type(name: str) -> MessageType:
    if len(name) > subjects.MAX_TYPE_NAME or not is_type_name(name):
        raise Refused(400, "invalid_type", f"{name[:64]!r} is not a message type name")
    try:
        return registry.get(name)
    except UnknownTypeError:
        raise Refused(404, "unknown_type", f"no message type {name!r} is declared on this gateway") from None


def timeout(value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= MAX_TIMEOUT:
        said = f"a timeout is seconds, more than 0 and at most {MAX_TIMEOUT:g}"
        raise Refused(400, "invalid_timeout", said)
    return seconds


def delivery_key(headers: Mapping[str, str], body: bytes) -> str | None:
    """What makes a repeat of this request the same message.

    A request that authenticated by a timestamped signature: the signed time and the body,
    whatever else it says (its other headers are not signed: a captured request sent again
    with a new Idempotency-Key must still be the same message, dropped within the dedupe
    window, after which its signature is too old; the ``v1`` list is left out, since one
    good signature among others passes). Else its ``Idempotency-Key``; else a webhook's own
    delivery id, GitHub's ``X-GitHub-Delivery``. None: each request is a new message."""
    signed = headers.get(TIMESTAMPED_HEADER)
    if signed is not None and "authorization" not in headers and SIGNATURE_HEADER not in headers:
        stamp, _ = signature_parts(signed[:1024])
        if stamp is not None:
            return f"signed:{stamp}:{hashlib.sha256(body).hexdigest()[:48]}"
    key = headers.get("idempotency-key")
    if key is not None:
        return key
    delivery = headers.get("x-github-delivery")
    if delivery is not None and _KEY.match(delivery):
        return f"github:{delivery}"
    return None


def trace_context(headers: Mapping[str, str]) -> Context | None:
    """The caller's W3C trace context (``traceparent``, ``tracestate``), so the messages a call
    sends continue the caller's trace; None (a new trace) without one, or with one longer
    than W3C allows."""
    parent = headers.get("traceparent")
    if parent is None or len(parent) > 55 or len(headers.get("tracestate", "")) > 512:
        return None
    return propagate.extract({"traceparent": parent, "tracestate": headers.get("tracestate", "")})


def idempotent_ids(principal: str, key: str | None) -> tuple[str | None, str | None]:
    """(message id, conversation id) for an Idempotency-Key, or (None, None) without one.

    Both are derived from the key and the caller (two callers' equal keys are two messages),
    so a repeat carries the same Nats-Msg-Id (the stream drops it) into the same conversation.
    """
    if key is None:
        return None, None
    if not _KEY.match(key):
        said = f"an Idempotency-Key is 1-{MAX_KEY} of A-Z a-z 0-9 _ . : -"
        raise Refused(400, "invalid_idempotency_key", said)
    digest = hashlib.sha256(f"{principal}\n{key}".encode()).hexdigest()
    return digest[:32], digest[32:]


def decode(body: bytes, mtype: MessageType) -> Message:
    """The body as a `mtype`; 422 with where and what is wrong."""
    try:
        return msgspec.json.decode(body, type=mtype.cls)
    except msgspec.ValidationError as exc:
        text = str(exc)
        message, _, path = text.rpartition(" - at `")
        if not message:
            message, path = text, "$`"
        raise Refused(
            422,
            "invalid_body",
            f"the body is not a valid {mtype}: {text}",
            errors=[{"path": path.rstrip("`"), "message": message}],
        ) from None
    except msgspec.DecodeError as exc:
        raise Refused(422, "invalid_json", f"the body is not valid JSON: {exc}") from None
