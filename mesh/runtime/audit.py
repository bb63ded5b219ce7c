"""The audit trail: an append-only record of what identities did on the mesh.

Every tool call (who, a digest of its arguments, how it ended), approval decision, memory
read, write and forget, authorization failure and dead-letter re-drive is appended to the
``MESH_AUDIT`` stream (no deletes, no purges) by the process where it happened, on its own
subject ``mesh_audit.<writer>.<instance>``: an agent may publish only under its own name, and
only the operator role reads the stream (docs/security.md).

Tamper-evident: each process keeps one chain. A record carries its position (`seq`) and the
SHA-256 of the previous record's bytes (`prev`), so a record changed, removed or slipped in
afterwards breaks the chain at that point, and `verify` (``mesh audit verify``) says where.

One function appends: `AuditLog.append`, through the path the conversation record is
written by too (`mesh.observability.record.keep`). Appending never fails the work it
records: a record that cannot be stored is logged, and the gap it leaves shows in the chain.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import msgspec
import structlog

from mesh.observability.record import keep
from mesh.transport.streams import AUDIT
from mesh.wire import envelope as h
from mesh.wire import subjects

if TYPE_CHECKING:
    from mesh.transport.base import Transport

STREAM: Final = AUDIT
# dead letters that are authorization failures (mesh.runtime.ladder, mesh.patterns.approval)
AUTH_FAILURES: Final = frozenset({"unauthorized", "unauthenticated", "rate_limited"})

log = structlog.get_logger("mesh.audit")


class AuditRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One thing that happened. `actor` is the identity that caused it (the sender of the
    message being handled, `mesh.wire.senders.sender_of`); `writer` the process's own."""

    kind: str  # tool_call, approval, memory, unauthorized, redrive, ...
    writer: str
    actor: str
    at: float
    seq: int  # position in the writer process's chain, from 1
    prev: str  # SHA-256 (hex) of the previous record's bytes; "" for the first
    trace_id: str = ""
    conversation: str = ""
    detail: dict[str, str] = {}


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(AuditRecord).decode


def digest(value: Any) -> str:
    """A stable SHA-256 of a JSON-able value (arguments are recorded by digest, not in clear)."""
    return hashlib.sha256(msgspec.json.encode(value, order="sorted")).hexdigest()


class AuditLog:
    """The audit chain of one process of `writer`."""

    def __init__(self, transport: Transport, writer: str, instance: str) -> None:
        self.transport = transport
        self.writer = writer
        self.subject = subjects.audit_subject(writer, instance)
        self._seq = 0
        self._prev = ""
        self._lock = asyncio.Lock()

    async def append(
        self,
        kind: str,
        *,
        actor: str,
        trace_id: str = "",
        conversation: str = "",
        detail: Mapping[str, object] | None = None,
    ) -> None:
        """Store one record at the end of this process's chain."""
        async with self._lock:  # one at a time: each names the one before
            record = AuditRecord(
                kind=kind,
                writer=self.writer,
                actor=actor,
                at=time.time(),
                seq=self._seq + 1,
                prev=self._prev,
                trace_id=trace_id,
                conversation=conversation,
                detail={k: str(v) for k, v in (detail or {}).items()},
            )
            data = _encode(record)
            if not await keep(self.transport, self.subject, data, wait=True, what=f"audit record {kind}"):
                return
            self._seq, self._prev = record.seq, hashlib.sha256(data).hexdigest()


async def audit_refusal(audit: AuditLog, msg: Any, kind: str, reason: str) -> None:
    """Append an authorization failure, with who the message says it is from (it was
    refused, so that claim is all there is) and its trace."""
    headers = getattr(msg, "headers", None) or {}
    traceparent = str(headers.get("traceparent", ""))
    await audit.append(
        kind,
        actor=str(headers.get(h.SENDER, ""))[: h.MAX_NAME],
        trace_id=traceparent.split("-")[1] if traceparent.count("-") == 3 else "",
        conversation=str(headers.get(h.CONVERSATION, ""))[:128],
        detail={"subject": str(getattr(msg, "subject", ""))[:256], "reason": reason[:512]},
    )


@dataclass(frozen=True, slots=True)
class Break:
    """Where a chain does not hold: the stream sequence of the record and why."""

    subject: str
    stream_seq: int
    reason: str


def verify(stored: Iterable[tuple[str, int, bytes]]) -> tuple[int, list[Break]]:
    """Check every chain in `stored` (subject, stream sequence, data, in stream order): how
    many records were read, and each break."""
    heads: dict[str, tuple[int, str]] = {}  # subject -> (seq, hash) of its last record
    breaks: list[Break] = []
    count = 0
    for subject, stream_seq, data in stored:
        count += 1
        try:
            record = _decode(data)
        except msgspec.DecodeError as exc:
            breaks.append(Break(subject, stream_seq, f"not an audit record: {exc}"))
            continue
        seq, prev = heads.get(subject, (0, ""))
        if subject not in heads and record.seq > 1:
            breaks.append(
                Break(subject, stream_seq, f"the chain starts at record {record.seq}: earlier ones are gone")
            )
        elif record.seq != seq + 1 or record.prev != prev:
            breaks.append(
                Break(
                    subject,
                    stream_seq,
                    f"record {record.seq} follows record {seq} of this chain but names "
                    f"{record.prev[:12] or 'no record'} as the one before (expected {prev[:12] or 'none'}): "
                    f"changed, removed or inserted",
                )
            )
        heads[subject] = (record.seq, hashlib.sha256(data).hexdigest())
    return count, breaks


def decoded(data: bytes) -> AuditRecord:
    return _decode(data)
