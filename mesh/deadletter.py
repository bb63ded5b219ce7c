"""Dead letters: a message an agent cannot process is kept, never dropped.

It is republished on ``mesh.<conversation>.dlq.<agent>`` with its original bytes and
headers, plus ``Mesh-Dlq-*`` headers giving the reason. The ``MESH_DLQ`` stream stores
every dead letter; `mesh dlq` lists them and re-drives one to its agent.
"""

from __future__ import annotations

from typing import Any

import structlog

from mesh import envelope as h
from mesh import subjects
from mesh.transport import Transport

log = structlog.get_logger("mesh.deadletter")


def dead_letter_subject(subject: str, agent: str) -> str:
    address = subjects.parse(subject)
    conv = address.conversation if address is not None else "_"
    return subjects.Address.dead_letter(conv, agent).subject


async def dead_letter(
    transport: Transport,
    *,
    agent: str,
    msg: Any,
    kind: str,
    reason: str,
    extra: dict[str, str] | None = None,
) -> bool:
    """Store `msg` (a delivery: subject, data, headers) on the dead-letter subject with the
    reason. False if even that failed (the caller must then not acknowledge `msg`)."""
    headers: dict[str, str] = {}
    for name, value in (msg.headers or {}).items():
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
            **(extra or {}),
        }
    )
    subject = dead_letter_subject(msg.subject, agent)
    log.warning("dead-lettered", kind=kind, reason=reason, subject=msg.subject, dlq=subject)
    try:
        await transport.store(subject, msg.data, headers)
        return True
    except Exception as exc:  # the bus itself failed; say so loudly, with the bytes
        log.error(
            "dead letter could not be published",
            error=str(exc),
            subject=msg.subject,
            headers=msg.headers,
            data=msg.data[:4096].hex(),
        )
        return False


def _one_line(text: str, limit: int = 2000) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
