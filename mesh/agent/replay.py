"""Replaying a recorded conversation through new versions of agents, as a regression test
(`mesh replay`, `mesh record --export`, `mesh.testing.replay_file`).

A `Recording` is a conversation's record entries (mesh.observability.record), as read from
``MESH_RECORD`` or from a file written by `mesh record --export`, with the journaled model
and tool results of its deliveries where the journal still has them.

`replay` runs it on an isolated mesh: a nats-server of its own (a child process on a free
loopback port, with a temporary store), nothing else connected. Only the agents being
tested run there, under their new code. Everything else comes from the recording:

- **inputs**: each message the tested agents received from anyone but themselves (from
  clients, from the agents not under test, decisions, fan-out answers) is sent again, in
  the order they took it, each once the one before is settled. Lineage headers are kept, so
  the ids of what the agents send are derived as they were; deadlines move with the clock;
- **the other agents**: a direct request to an agent not under test is answered with the
  answer recorded for it; a handoff to one is kept as an output, and goes no further;
- **the model and the tools**: journaled results are put back in the isolated mesh's
  journal, so a re-run gets the recorded answers (the offline model answers calls past
  them); with ``live_model`` the journal is left empty and the configured model answers.

Then what the tested agents sent is compared with what they sent in the recording,
message by message (ids are derived from the message handled and the position of the
send, so the same work gets the same id): a message missing or extra, another type, other
routing (subject, reply target, route), or other fields (a path for each). Fields that hold
a clock time the mesh sets (``expires_ms``, ``due_ms``) are not compared, nor any in
``ignore`` (mesh.agent.diff).
"""

from __future__ import annotations

import asyncio
import base64
import json
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import structlog

from mesh.agent.declaration import Agent
from mesh.agent.diff import CLOCK_FIELDS, Difference, Report, compare
from mesh.agent.runner import AgentRuntime
from mesh.llm import LLM
from mesh.llm.journal import journal_key
from mesh.observability import history
from mesh.observability import record as rec
from mesh.transport.memstreams import Stored
from mesh.transport.nats import NatsTransport
from mesh.transport.server import EmbeddedServer
from mesh.transport.state import StateStore
from mesh.transport.streams import bucket_specs
from mesh.wire import envelope as h
from mesh.wire import subjects
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

FORMAT: Final = "mesh-record/1"
Journal = list[tuple[str, bytes]]  # journaled results: (key, value), as the journal keeps them
_FINAL: Final = frozenset({rec.HANDLED, rec.DEAD_LETTER, rec.DUPLICATE})

log = structlog.get_logger("mesh.replay")


@dataclass(slots=True)
class Recording:
    """A conversation's record entries, and journaled results (key, value) where kept."""

    conversation: str
    entries: list[Stored]
    journal: Journal = field(default_factory=list)

    @classmethod
    async def from_mesh(
        cls, transport: NatsTransport, conversation: str, settings: Settings | None = None
    ) -> Recording:
        """Read a conversation's record, and (given `settings`, as an identity that may read
        the journal: the operator) the journaled results of each of its handlings."""
        pattern = subjects.record_pattern(subjects.conversation_id(conversation))
        entries = [e async for e in history.entries(transport, pattern)]
        if not entries:
            raise ConfigError(
                f"no record of conversation {conversation!r}: see `mesh conversations` (kept for "
                f"MESH_RECORD_RETENTION)"
            )
        journal: Journal = []
        if settings is not None:
            try:
                store = await transport.state(bucket_specs(settings)[3], settings)
                for m in history.merge(entries):
                    for agent in sorted({d.agent for d in m.deliveries}):
                        journal += await _journaled(store, agent, m.id)
            except Exception as exc:  # the record is still worth having
                log.warning(
                    "the journal could not be read (it takes the operator's identity): "
                    "the recording has no journaled model or tool results",
                    error=repr(exc),
                )
                journal = []
        return cls(conversation, entries, journal)

    def dumps(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "conversation": self.conversation,
                "entries": [
                    {
                        "subject": e.subject,
                        "seq": e.seq,
                        "at": e.at,
                        "headers": e.headers or {},
                        "data": base64.b64encode(e.data).decode(),
                    }
                    for e in self.entries
                ],
                "journal": [{"key": k, "value": base64.b64encode(v).decode()} for k, v in self.journal],
            },
            indent=1,
        ).encode()

    @classmethod
    def load(cls, path: Path) -> Recording:
        try:
            raw = json.loads(Path(path).read_bytes())
            if raw.get("format") != FORMAT:
                raise ValueError(f"format {raw.get('format')!r}, not {FORMAT}")
            entries = [
                Stored(
                    str(e["subject"]),
                    base64.b64decode(e["data"]),
                    dict(e["headers"]),
                    int(e["seq"]),
                    float(e["at"]),
                )
                for e in raw["entries"]
            ]
            journal = [(str(j["key"]), base64.b64decode(j["value"])) for j in raw.get("journal", [])]
            return cls(subjects.conversation_id(str(raw["conversation"])), entries, journal)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path} is not a conversation written by `mesh record --export`: {exc}"
            ) from None


async def replay(
    recording: Recording,
    agents: Mapping[str, Agent],
    *,
    ignore: Iterable[str] = (),
    live_model: bool = False,
    settle_timeout: float = 30.0,
    base: Settings | None = None,
    llm: LLM | None = None,
) -> Report:
    """Run `recording` through `agents` (name → the new version) on an isolated mesh. The
    model answering what the journal does not is `llm`, or the one `base` configures."""
    for name, agent in agents.items():
        if agent.name != name:
            raise ConfigError(
                f"--agent {name}=... names an agent called {agent.name!r}: use {agent.name}=..."
            )
    tested = frozenset(agents)
    msgs = history.merge(recording.entries)
    inputs = _inputs(msgs, tested)
    recorded = [m for m in msgs if m.sent_by in tested]
    with tempfile.TemporaryDirectory(prefix="mesh-replay-") as tmp:
        server = EmbeddedServer(Path(tmp) / "nats", name="mesh-replay")
        info = await asyncio.to_thread(server.start)
        try:
            settings = _isolated(base, info.url, Path(tmp))
            replayed, unsettled = await _run(
                recording, agents, inputs, settings, live_model, settle_timeout, llm
            )
        finally:
            await asyncio.to_thread(server.stop)
    differences = compare(recorded, replayed, CLOCK_FIELDS | frozenset(ignore))
    for m in unsettled:
        takers = ",".join(sorted({d.agent for d in m.deliveries if d.agent in tested}))
        differences.append(Difference("unsettled", takers, m.id, m.type))
    notes = []
    if live_model:
        notes.append("the model answered live (--live-model): its answers may differ from the recording's")
    elif not recording.journal and any(
        d.input_tokens for m in msgs for d in m.deliveries if d.agent in tested
    ):
        notes.append("the recording holds no journaled model results: the model answered anew")
    return Report(
        recording.conversation,
        tuple(sorted(tested)),
        len(inputs),
        len(recorded),
        len(replayed),
        differences,
        notes,
    )


def _isolated(base: Settings | None, url: str, directory: Path) -> Settings:
    values = base.model_dump() if base is not None else {}
    values.update(
        nats_url=url,
        data_dir=directory / "data",
        insecure=True,
        nats_creds=None,
        identities=None,
        record=True,
        storage="memory",
        retry_backoff=min(base.retry_backoff if base is not None else 1.0, 0.1),  # the same retries, sooner
        replicas=1,
    )
    return Settings.model_validate(values)


def _inputs(msgs: list[history.Recorded], tested: frozenset[str]) -> list[history.Recorded]:
    """What the tested agents took from others, in the order they first took it."""
    taken = []
    for m in msgs:
        firsts = [d.at for d in m.deliveries if d.agent in tested]
        if firsts and m.sent_by not in tested and m.sender not in tested:
            taken.append((min(firsts), m.seq, m))
    return [m for _, _, m in sorted(taken, key=lambda t: (t[0], t[1]))]


async def _run(
    recording: Recording,
    agents: Mapping[str, Agent],
    inputs: list[history.Recorded],
    settings: Settings,
    live_model: bool,
    settle_timeout: float,
    llm: LLM | None,
) -> tuple[list[history.Recorded], list[history.Recorded]]:
    """What the tested agents sent on the isolated mesh, and the inputs they did not settle."""
    conv = recording.conversation
    unsettled: list[history.Recorded] = []
    asking: set[asyncio.Task[None]] = set()
    driver = await NatsTransport.connect(settings, "mesh-replay")
    runtimes: list[tuple[AgentRuntime, NatsTransport]] = []
    try:
        await driver.ensure_streams()
        if recording.journal and not live_model:
            await seed_journal(driver, settings, recording.journal)
        stand_ins = await _stand_ins(driver, history.merge(recording.entries), frozenset(agents), conv)
        for agent in agents.values():
            transport = await NatsTransport.connect(settings, agent.name)
            runtime = AgentRuntime(agent, settings, transport, llm=llm)
            await runtime.start()
            runtimes.append((runtime, transport))
        for m in inputs:
            await _send(driver, m, asking)
            if not await _settled(driver, conv, m, frozenset(agents), settle_timeout):
                unsettled.append(m)
        await asyncio.sleep(0.3)  # what the last input's handling sent is recorded without a wait
        replayed = [m for m in await history.conversation(driver, conv) if m.sent_by in agents]
        for sub in stand_ins:
            await sub.unsubscribe()
        return replayed, unsettled
    finally:
        for task in asking:
            task.cancel()
        for runtime, transport in runtimes:
            await runtime.stop(timeout=5)
            await transport.close()
        await driver.close()


async def _journaled(store: StateStore, agent: str, message_id: str) -> Journal:
    """The raw journal entries of one handling, as kept: key and value, each kind in order."""
    found: Journal = []
    kinds: tuple[Literal["llm"], Literal["tool"]] = ("llm", "tool")
    for kind in kinds:
        for index in range(10_000):
            key = journal_key(agent, message_id, kind, index)
            got = await store.get(key)
            if got is None:
                break
            found.append((key, got[0]))
    return found


async def seed_journal(transport: NatsTransport, settings: Settings, journal: Journal) -> None:
    """Put journaled results into the isolated mesh's journal (mesh.llm.journal), where
    the tested agents' handlings find them under the same keys."""
    store = await transport.state(bucket_specs(settings)[3], settings)
    for key, value in journal:
        await store.put(key, value)


async def _stand_ins(
    transport: NatsTransport, msgs: list[history.Recorded], tested: frozenset[str], conv: str
) -> list[Any]:
    """Answer direct requests to agents not under test with their recorded answers. A request
    has an id of its own each time, so it is matched by its place: who asked, handling which
    message, to which agent, the how-many-th time (a retried handler asks again from the start)."""
    others = [m for m in msgs if m.sent_by and m.sent_by not in tested]
    answers = {m.causation: m for m in others if m.kind == subjects.REPLY}
    asked: dict[tuple[str, str, str], list[history.Recorded]] = {}
    for m in msgs:
        address = subjects.parse(m.subject)
        if (
            address is None
            or address.kind != subjects.DIRECT
            or address.target in tested
            or m.id not in answers
        ):
            continue
        asked.setdefault((m.sender, m.causation, address.target), []).append(answers[m.id])
    seen: dict[tuple[str, str, str], int] = {}

    async def answer(msg: Any) -> None:
        headers = msg.headers or {}
        address = subjects.parse(msg.subject)
        key = (headers.get(h.SENDER, ""), headers.get(h.CAUSATION, ""), address.target if address else "")
        recorded = asked.get(key)
        if recorded and msg.reply:
            n = seen.get(key, 0)
            seen[key] = n + 1
            found = recorded[n % len(recorded)]
            await transport.publish(msg.reply, found.data, dict(found.headers))

    targets = sorted({target for _, _, target in asked})
    return [await transport.subscribe(subjects.Address.direct(conv, t).subject, answer) for t in targets]


async def _send(transport: NatsTransport, m: history.Recorded, asking: set[asyncio.Task[None]]) -> None:
    headers = dict(m.headers)
    now = h.now_ns()
    sent = headers.get(h.SENT_AT, "")
    if h.DEADLINE in headers and sent.isdigit() and headers[h.DEADLINE].isdigit():
        shift = (now - int(sent)) // 1_000_000  # the deadline moves with the clock
        headers[h.DEADLINE] = str(int(headers[h.DEADLINE]) + shift)
    headers[h.SENT_AT] = str(now)
    headers[h.NATS_MSG_ID] = m.id
    if m.kind == subjects.DIRECT:  # asked, and the answer left to the record
        task = asyncio.ensure_future(_ask(transport, m.subject, m.data, headers))
        asking.add(task)
        task.add_done_callback(asking.discard)
    else:
        await transport.store(m.subject, m.data, headers)


async def _ask(transport: NatsTransport, subject: str, data: bytes, headers: dict[str, str]) -> None:
    try:
        await transport.request(subject, data, 30.0, headers=headers)
    except Exception:  # the answer is in the isolated record, or its absence is a difference
        return


async def _settled(
    transport: NatsTransport, conv: str, m: history.Recorded, tested: frozenset[str], timeout: float
) -> bool:
    """Wait until every tested agent that took `m` in the recording has settled it, and
    everything the tested agents sent each other since is settled too (a retry included)."""
    wanted = {d.agent for d in m.deliveries if d.agent in tested}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = await history.conversation(transport, conv)
        got = next((r for r in now if r.id == m.id), None)
        if got is not None and wanted <= _settled_by(got) and all(_internal_settled(r, tested) for r in now):
            return True
        await asyncio.sleep(0.02)
    return False


def _settled_by(m: history.Recorded) -> set[str]:
    return {d.agent for d in m.deliveries if d.outcome in _FINAL}


def _internal_settled(m: history.Recorded, tested: frozenset[str]) -> bool:
    """A message to a tested agent's inbox or direct line was settled by it (timers wait
    for their time: not counted)."""
    address = subjects.parse(m.subject)
    if (
        address is None
        or address.kind not in (subjects.AGENT, subjects.DIRECT)
        or address.target not in tested
    ):
        return True
    return address.target in _settled_by(m)
