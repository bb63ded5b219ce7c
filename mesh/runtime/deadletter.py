"""Dead letters: a message an agent cannot process is kept, never dropped.

It is republished on ``mesh.<conversation>.dlq.<agent>`` with its original bytes and
headers, plus ``Mesh-Dlq-*`` headers giving the reason. The ``MESH_DLQ`` stream stores
every dead letter; `mesh dlq` lists them and re-drives one to its agent. Secret headers
(credentials, `MESH_SECRET_HEADERS`: see `mesh.wire.secrets`) are left out, and the letter
names them in ``Mesh-Dlq-Masked``: whoever reads dead letters does not get credentials.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgspec
import structlog

from mesh.transport.base import Transport
from mesh.transport.natsclient import header_bytes
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.messages import Message, message
from mesh.wire.secrets import without_secrets
from mesh.wire.signature import Signer

log = structlog.get_logger("mesh.runtime.deadletter")


@message("mesh.delivery_failed")
class DeliveryFailed(Message, frozen=True):
    """The answer to a request (a direct message with a NATS reply subject) that an agent
    could not handle: the dead letter's kind and reason. The request is dead-lettered too."""

    kind: str
    reason: str
    agent: str
    message_id: str = ""


def dead_letter_subject(subject: str, agent: str) -> str:
    """Where a message received on `subject` goes when `agent` gives up on it. The
    conversation token is used only if it is a valid one: a subject built from an unchecked
    value could be too long for the server, which would close the connection."""
    address = subjects.parse(subject)
    conv = address.conversation if address is not None else "_"
    return subjects.Address.dead_letter(conv if subjects.is_conversation_id(conv) else "_", agent).subject


async def answer_failure(
    transport: Transport, msg: Any, agent: str, kind: str, reason: str, signer: Signer | None = None
) -> None:
    """Tell a requester waiting on `msg.reply` why its request was not handled (signed by
    `signer`, the agent's identity, on a mesh with identities)."""
    if not msg.reply:
        return
    body = msgspec.json.encode(
        DeliveryFailed(kind=kind, reason=_one_line(reason), agent=agent, message_id=_sender_id(msg))
    )
    headers = {h.TYPE: "mesh.delivery_failed", h.VERSION: "1", h.ID: h.new_id(), h.SENDER: agent}
    if signer is not None:
        headers[h.SENT_AT] = str(h.now_ns())
        signer.sign(msg.reply, headers, body)
    try:
        await transport.publish(msg.reply, body, headers)
    except Exception as exc:  # the requester still times out; the dead letter has it all
        log.warning("could not answer a failed request", error=str(exc), kind=kind)


def _sender_id(msg: Any) -> str:
    got = (msg.headers or {}).get(h.ID, "")
    return got if len(got) <= h.MAX_ID else ""


async def dead_letter(
    transport: Transport,
    *,
    agent: str,
    msg: Any,
    kind: str,
    reason: str,
    extra: dict[str, str] | None = None,
    secret_headers: Collection[str] = (),
) -> bool:
    """Store `msg` (a delivery: subject, data, headers) on the dead-letter subject with the
    reason, without its secret headers (`secret_headers`: more names, lower-case, from
    MESH_SECRET_HEADERS). False if even that failed (the caller must then not acknowledge
    `msg`)."""
    original, masked = without_secrets(msg.headers or {}, secret_headers)
    headers: dict[str, str] = {}
    if masked:
        headers[h.DLQ_MASKED] = ",".join(masked)
    for name, value in original.items():
        # Nats-* headers steer JetStream (dedupe, expected stream/sequence, rollup, TTL) and
        # could make the store refuse or drop the dead letter: keep them under another name.
        if name.lower().startswith("nats-"):
            headers[h.DLQ_ORIGINAL_PREFIX + name] = value
        else:
            headers[name] = value
    headers.update(
        {
            h.DLQ_KIND: kind,
            h.DLQ_REASON: _one_line(reason),
            h.DLQ_SUBJECT: msg.subject,
            h.DLQ_AGENT: agent,
            h.DLQ_AT: str(h.now_ns()),
            # its own id, so a store retried after a timeout keeps one copy in the stream
            h.NATS_MSG_ID: h.new_id(),
            **(extra or {}),
        }
    )
    subject = dead_letter_subject(msg.subject, agent)
    log.warning("dead-lettered", kind=kind, reason=reason, subject=msg.subject[:200], dlq=subject)
    letter, body, rest = fit(headers, msg.data, transport.max_payload)
    try:
        await transport.store(subject, body, letter)
        if rest:  # the tail of a body that did not fit beside the Mesh-Dlq-* headers
            tail = {
                h.DLQ_KIND: CONTINUATION,
                h.DLQ_AGENT: agent,
                h.DLQ_OF: letter[h.DLQ_ID],
                h.DLQ_OFFSET: str(len(body)),
                h.DLQ_AT: str(h.now_ns()),
                h.NATS_MSG_ID: h.new_id(),
            }
            await transport.store(subject, rest, tail)
        return True
    except Exception as exc:  # the bus itself failed; say so loudly, with the bytes
        log.error(
            "dead letter could not be published",
            error=str(exc),
            subject=msg.subject[:200],
            headers={k: v[:200] for k, v in original.items()},
            masked=masked,
            data=msg.data[:4096].hex(),
        )
        return False


CONTINUATION = "continuation"
_MARGIN = 512  # room kept for the Mesh-Dlq-Truncated/-Id headers and rounding


def fit(headers: dict[str, str], data: bytes, room: int) -> tuple[dict[str, str], bytes, bytes]:
    """Make a dead letter fit the server's max_payload (`room`): the headers, the body to
    store with them, and the rest of the body (b"" when it all fits), to be stored as a
    ``continuation`` letter. A message that arrived near the limit would otherwise come back
    over it with the Mesh-Dlq-* headers added, and the server closes the connection of a
    client that sends one."""
    if len(data) + header_bytes(headers) <= room:
        return headers, data, b""
    headers.pop(h.DLQ_HISTORY, None)  # first what the mesh added
    headers[h.DLQ_REASON] = _one_line(headers[h.DLQ_REASON], 200)
    headers[h.DLQ_SUBJECT] = headers[h.DLQ_SUBJECT][:256]
    cut = []
    while header_bytes(headers) > room // 2:  # only hostile headers get here: cut the largest
        name = max(headers, key=lambda k: len(headers[k]))
        headers[name] = headers[name][: len(headers[name]) // 4]
        cut.append(name)
    if cut:
        headers[h.DLQ_CUT_HEADERS] = ",".join(sorted(set(cut)))[:256]
    headers[h.DLQ_TRUNCATED] = str(len(data))
    headers[h.DLQ_ID] = h.new_id()
    keep = max(0, room - header_bytes(headers) - _MARGIN)
    return headers, data[:keep], data[keep:]


def _one_line(text: str, limit: int = 2000) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
