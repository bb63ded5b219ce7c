"""Discovery over the NATS service API (``$SRV.PING|INFO|STATS``).

Every agent process answers as a NATS micro service named after the agent, so
`mesh agents` and `nats micro ls` both list it. Replicas share the name and differ in id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from mesh.transport.base import Subscription, Transport
from mesh.transport.keys import KeyDirectory
from mesh.wire import envelope as h
from mesh.wire.envelope import new_id
from mesh.wire.signature import BadSignature, Signer, verify

PREFIX = "$SRV"
PROTOCOL = "1"

log = structlog.get_logger("mesh.runtime.discovery")


@dataclass(frozen=True)
class Endpoint:
    name: str
    subject: str
    queue_group: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Stats:
    """Counters of one agent process, reported on ``$SRV.STATS``."""

    received: int = 0
    handled: int = 0
    errors: int = 0
    dead_lettered: int = 0
    in_flight: int = 0
    retried: int = 0  # failed and handed back for a later delivery
    redelivered: int = 0  # deliveries that were not the first
    duplicates: int = 0  # redeliveries of an already processed message, skipped
    escalated: int = 0  # failed their last retry and went to a fallback agent or to people
    processing_ns: int = 0
    last_error: str = ""


class ServiceResponder:
    """Answers ``$SRV`` PING/INFO/STATS for one agent process."""

    def __init__(
        self,
        transport: Transport,
        *,
        name: str,
        version: str,
        description: str,
        metadata: dict[str, str],
        endpoints: list[Endpoint],
        stats: Callable[[], Stats],
        instance: str | None = None,
        signer: Signer | None = None,
    ) -> None:
        self.transport = transport
        self.signer = signer  # answers are signed as the agent, so a reader can tell them from forgeries
        self.name = name
        self.id = instance or new_id()
        self.version = version
        self.description = description
        self.metadata = {"mesh.protocol": PROTOCOL, **metadata}
        self.endpoints = endpoints
        self._stats = stats
        self._started = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        self._subs: list[Subscription] = []

    def _identity(self, kind: str) -> dict[str, Any]:
        return {
            "type": f"io.nats.micro.v1.{kind}_response",
            "name": self.name,
            "id": self.id,
            "version": self.version,
            "metadata": self.metadata,
        }

    def info(self) -> dict[str, Any]:
        return {
            **self._identity("info"),
            "description": self.description,
            "endpoints": [
                {"name": e.name, "subject": e.subject, "queue_group": e.queue_group, "metadata": e.metadata}
                for e in self.endpoints
            ],
        }

    def stats(self) -> dict[str, Any]:
        s = self._stats()
        avg = s.processing_ns // s.received if s.received else 0
        return {
            **self._identity("stats"),
            "started": self._started,
            "endpoints": [
                {
                    "name": e.name,
                    "subject": e.subject,
                    "queue_group": e.queue_group,
                    # The process shares one worker pool across endpoints; totals are reported
                    # on the first endpoint so sums over endpoints stay right.
                    "num_requests": s.received if i == 0 else 0,
                    "num_errors": s.errors + s.dead_lettered if i == 0 else 0,
                    "last_error": s.last_error if i == 0 else "",
                    "processing_time": s.processing_ns if i == 0 else 0,
                    "average_processing_time": avg if i == 0 else 0,
                    "data": {
                        "handled": s.handled,
                        "errors": s.errors,
                        "dead_lettered": s.dead_lettered,
                        "in_flight": s.in_flight,
                        "retried": s.retried,
                        "redelivered": s.redelivered,
                        "duplicates": s.duplicates,
                        "escalated": s.escalated,
                    }
                    if i == 0
                    else {},
                }
                for i, e in enumerate(self.endpoints)
            ],
        }

    async def start(self) -> None:
        answers = {"PING": lambda: self._identity("ping"), "INFO": self.info, "STATS": self.stats}
        for verb, answer in answers.items():

            async def respond(msg: Any, answer: Callable[[], dict[str, Any]] = answer) -> None:
                if msg.reply:
                    data = json.dumps(answer()).encode()
                    headers: dict[str, str] | None = None
                    if self.signer is not None:
                        headers = {h.SENDER: self.name, h.SENT_AT: str(h.now_ns())}
                        self.signer.sign(msg.reply, headers, data)
                    await self.transport.publish(msg.reply, data, headers)

            for subject in (
                f"{PREFIX}.{verb}",
                f"{PREFIX}.{verb}.{self.name}",
                f"{PREFIX}.{verb}.{self.name}.{self.id}",
            ):
                self._subs.append(await self.transport.subscribe(subject, respond))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):  # a closed connection has no interest left
                await sub.unsubscribe()
        self._subs.clear()


def _signed_by(directory: KeyDirectory, msg: Any, body: dict[str, Any]) -> bool:
    """Whether a discovery answer is signed by the agent whose name it carries."""
    try:
        signer = verify(msg.subject, dict(msg.headers or {}), msg.data)
    except BadSignature:
        return False
    return directory.identity(signer) == f"agent:{body.get('name', '')}"


@dataclass(frozen=True)
class AgentInstance:
    """One running agent process, as discovery sees it."""

    name: str
    id: str
    version: str
    description: str
    handles: list[str]
    endpoints: list[dict[str, Any]]
    stats: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


async def discover(
    transport: Transport, *, timeout: float = 0.5, name: str = "", directory: KeyDirectory | None = None
) -> list[AgentInstance]:
    """Ask every mesh agent process for its INFO and STATS; gather answers for `timeout` s.

    With a `directory` (a mesh with identities) an answer counts only if it is signed by
    the agent it describes: any agent may publish replies, so without the signature one
    could pose as another and advertise tools it does not have."""
    infos: dict[str, dict[str, Any]] = {}
    stats: dict[str, dict[str, Any]] = {}
    inbox = transport.new_inbox()

    async def collect(msg: Any) -> None:
        try:
            body = json.loads(msg.data)
        except ValueError:
            return
        if directory is not None and not _signed_by(directory, msg, body):
            log.warning(
                "discovery answer not signed by the agent it describes",
                name=h.show(str(body.get("name", ""))),
            )
            return
        if body.get("type") == "io.nats.micro.v1.info_response":
            infos[body["id"]] = body
        elif body.get("type") == "io.nats.micro.v1.stats_response":
            stats[body["id"]] = body

    sub = await transport.subscribe(inbox, collect)
    try:
        suffix = f".{name}" if name else ""
        await transport.publish(f"{PREFIX}.INFO{suffix}", b"", reply=inbox)
        await transport.publish(f"{PREFIX}.STATS{suffix}", b"", reply=inbox)
        await transport.flush()
        await asyncio.sleep(timeout)  # answers arrive from an unknown number of processes
    finally:
        await sub.unsubscribe()
    out = []
    for sid, info in infos.items():
        meta = info.get("metadata") or {}
        if "mesh.protocol" not in meta:
            continue  # a NATS micro service that is not a mesh agent
        st = (stats.get(sid) or {}).get("endpoints") or [{}]
        out.append(
            AgentInstance(
                name=info["name"],
                id=sid,
                version=info.get("version", ""),
                description=info.get("description", ""),
                handles=[t for t in meta.get("mesh.handles", "").split(",") if t],
                endpoints=info.get("endpoints") or [],
                stats=st[0].get("data") or {},
                metadata=dict(meta),
            )
        )
    return sorted(out, key=lambda a: (a.name, a.id))


async def is_running(transport: Transport, name: str, *, timeout: float = 1.0) -> bool:
    """Whether a replica of agent `name` answers discovery now (the first answer is enough)."""
    try:
        await transport.request(f"{PREFIX}.PING.{name}", b"", timeout)
    except TimeoutError:
        return False
    except Exception as exc:
        if type(exc).__name__ == "NoRespondersError":  # nobody subscribes: not running
            return False
        raise
    return True


async def wait_for_agents(transport: Transport, wanted: dict[str, int], *, timeout: float = 15.0) -> None:
    """Return once discovery shows at least `wanted[name]` replicas of each agent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        found = await discover(transport, timeout=0.15)
        counts: dict[str, int] = {}
        for a in found:
            counts[a.name] = counts.get(a.name, 0) + 1
        if all(counts.get(n, 0) >= k for n, k in wanted.items()):
            return
        if loop.time() > deadline:
            raise TimeoutError(f"agents not up within {timeout:.0f}s: wanted {wanted}, found {counts}")


async def backlog(transport: Transport, agent: str) -> dict[str, int]:
    """An agent's stored queues, summed over its inbox and events consumers: messages
    waiting (pending), handed out and not yet acknowledged (unacked), redelivered."""
    from mesh.transport import streams

    total = {"pending": 0, "unacked": 0, "redelivered": 0}
    for stream in (streams.INBOX, streams.EVENTS):
        try:
            info = await transport.consumer_info(stream, agent)
        except Exception:
            continue  # no such consumer (an agent without event handlers)
        total["pending"] += int(info.num_pending or 0)
        total["unacked"] += int(info.num_ack_pending or 0)
        total["redelivered"] += int(info.num_redelivered or 0)
    return total
