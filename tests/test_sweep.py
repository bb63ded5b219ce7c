"""The bad-input sweep: a few thousand hostile messages across every documented subject kind,
sent as raw bytes to agent processes of their own nats-server while good conversations flow.

It asserts that no agent process dies or goes deaf (each answers discovery at the end), that
every good conversation completes, and that every bad message that reached an agent is
dead-lettered with a reason (direct requests are also answered with one). Counts are
printed. Every bad message is bad on purpose, in exactly one known way, so the dead letters
can be counted exactly.

It runs twice:

- on a server without authentication, the corpus unsigned: the checks past verification
  (subjects, headers, bodies, types, joins) meet every hostile byte as it is;
- on a secured server (every agent on its own identity, as `mesh up` and `mesh run` set it
  up), twice over: (a) the corpus signed with valid keys (the publisher role's; a timer with
  the coordinator's own, a compromised agent) so that each bad message passes verification
  and meets the same checks behind it, with the same kinds except where verification
  legitimately refuses first (`Bad.signed_kind` says where, and why); (b) a sample sent
  unsigned, with a compromised agent's credentials (the worker's): each one an agent receives
  is dead-lettered ``unauthenticated``, with no answer to a request, and the server refuses
  the rest (subjects the worker may not publish to). Good traffic flows during (a) and after
  (b). The server's refusals of publishes are counted too, from its ``-ERR`` lines.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from conftest import SAMPLES, raw_connect
from sample_agents import handoffs as ho
from sample_agents.echo import Ping, Pong

from mesh.join import JoinTimer
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import discover, wait_for_agents
from mesh.runtime.verify import UNAUTHENTICATED
from mesh.testing import Recorder, SecureServer, nats_server, secure_nats_server, spawn_agent, stop_process
from mesh.transport.auth import read_seed
from mesh.transport.server import EmbeddedServer
from mesh.wire import envelope as h
from mesh.wire.settings import Settings
from mesh.wire.signature import Signer

pytestmark = pytest.mark.slow

ECHO = f"{SAMPLES / 'echo.py'}:agent"
HANDOFFS = SAMPLES / "handoffs.py"
MAX_BODY = 4096  # the agents' MESH_MAX_MESSAGE_BYTES here, so oversize bodies stay cheap
BAD = 2400
GOOD = 40
RAW = 400  # of the corpus, sent unsigned on the secured mesh
AFTER = 10  # good conversations after the unsigned ones
PUBLISHER = "role:publisher"  # signs the corpus on the secured mesh (a person's or a program's key)
COMPROMISED = "agent:worker"  # its credentials send the unsigned sample
AGENT_ENV = {
    "MESH_MAX_MESSAGE_BYTES": str(MAX_BODY),
    "MESH_LOG_LEVEL": "error",
    "MESH_TRACE_EXPORTER": "none",
    "MESH_ACK_WAIT": "5",
    "MESH_MAX_DELIVER": "3",
    "MESH_RETRY_BACKOFF": "0.05",
}

# Mesh-Id values with every character class: all are valid ids (any string up to 128)
ODD_IDS = [
    "plain",
    "with space",
    "colon:17",
    "dots.in.it",
    "star*",
    "gt>",
    "slash/and\\back",
    "zahlung-für-4",
    "日本語",
    "emoji-\U0001f600",
    "tab\tin",
    "quote\"'`",
    "=equals=",
    "$JS.API",
    "%00%ff",
    "x" * 128,
]


@dataclass
class Bad:
    """One hostile message: where it goes, and the dead letter it must produce (or not)."""

    subject: bytes
    data: bytes
    headers: dict[str, str]
    agent: str  # the agent that dead-letters it ("" when no agent receives it)
    kind: str  # the dead letter kind it must get
    reply: bool = False
    # on a secured mesh: the identity whose key signs it, and the kind it gets signed where
    # verification refuses it before the check that `kind` names ("": `kind`)
    signer: str = PUBLISHER
    signed_kind: str = ""


@dataclass
class Sweep:
    rng: random.Random
    made: list[Bad] = field(default_factory=list)
    n: int = 0

    def headers(self, conv: str, type_name: str = "test.ping", **extra: str) -> dict[str, str]:
        self.n += 1
        out = {
            h.TYPE: type_name,
            h.VERSION: "1",
            h.ID: f"sweep-{self.n}",
            h.NATS_MSG_ID: f"sweep-{self.n}",
            h.SENDER: "sweep",
            h.HOP: "0",
        }
        out.update(extra)
        return out

    def conv(self) -> str:
        return f"sweep{self.rng.randrange(10**9)}"

    def body(self) -> tuple[bytes, str]:
        """A body that cannot be a test.ping, and the kind its dead letter gets."""
        good = b'{"text": "hello", "n": 3}'
        choice = self.rng.randrange(6)
        if choice == 0:
            return b"\xff" + self.rng.randbytes(self.rng.randrange(0, 200)), "decode"
        if choice == 1:
            return good[: self.rng.randrange(0, len(good))], "decode"  # a strict prefix
        if choice == 2:
            return self.rng.choice([b'{"text": 5}', b'{"text": null}', b"[]", b'"s"', b'{"n": "x"}']), (
                "validation"
            )
        if choice == 3:
            return b'{"text": "' + b"x" * self.rng.randrange(MAX_BODY, 4 * MAX_BODY) + b'"}', "oversize"
        if choice == 4:
            return msgspec.msgpack.encode({"text": 1}), "validation_msgpack"
        return b"\x00" * self.rng.randrange(1, 50), "decode"

    def add(
        self, subject: str | bytes, data: bytes, headers: dict[str, str], agent: str, kind: str, **more: Any
    ) -> None:
        raw = subject.encode() if isinstance(subject, str) else subject
        self.made.append(Bad(raw, data, headers, agent, kind, **more))

    def one(self) -> None:
        """Add one bad message, of a kind picked at random."""
        r = self.rng
        conv = self.conv()
        pick = r.randrange(14)
        if pick <= 2:  # a bad body, on the echo inbox, as an event, or on the direct line
            data, kind = self.body()
            headers = self.headers(conv)
            if kind == "validation_msgpack":
                headers[h.CONTENT_TYPE] = "application/msgpack"
                kind = "validation"
            where = ["agent.echo", "evt.test.ping", "direct.echo"][pick]
            if r.random() < 0.3:
                headers[h.ID] = r.choice(ODD_IDS)[:100] + f"-{self.n}"  # an odd id on a bad message
            self.add(f"mesh.{conv}.{where}", data, headers, "echo", kind)
        elif pick == 3:  # a header that is not an integer, or absurd
            name = r.choice([h.HOP, h.VERSION, h.DEADLINE, h.SENT_AT, h.DEPTH])
            value = r.choice(["abc", "1e9", "9" * r.randrange(21, 5000), "0x10", "--1"])
            # signed: verification reads Mesh-Sent-At first (is it fresh?), and refuses a
            # message without a time it can read
            signed = "unauthenticated" if name == h.SENT_AT else ""
            self.add(f"mesh.{conv}.agent.echo", b'{"text":"x"}', self.headers(conv, **{name: value}), "echo",
                     "bad_header", signed_kind=signed)  # fmt: skip
        elif pick == 4:  # an oversize or malformed header that would reach a subject or a key
            name, value = r.choice(
                [
                    (h.ID, "i" * r.randrange(129, 12_000) + str(self.n)),  # unique: no replay
                    (h.NATS_MSG_ID, "n" * r.randrange(129, 12_000) + str(self.n)),  # unique: no dedupe
                    (h.ROUTE, "r" * r.randrange(65, 12_000)),
                    (h.ROUTE, "echo,Not An Agent"),
                    (h.ROUTE, ",".join(["echo"] * 40)),
                    (h.REPLY_TO, "mesh.c.reply." + "t" * r.randrange(600, 12_000)),
                    (h.REPLY_TO, "mesh.c.agent.*"),
                    (h.REPLY_TO, "$JS.API.STREAM.DELETE.MESH_INBOX"),
                    (h.JOIN, "echo.*/0"),
                    (h.JOIN, "x" * 300),
                    (h.ANSWER, "y" * 300),
                    (h.CAUSATION, "c" * r.randrange(129, 12_000)),
                    (h.SENDER, "s" * r.randrange(129, 12_000)),
                    (h.CONTENT_TYPE, "application/" + "j" * 200),
                    (h.TYPE, "test." + "p" * r.randrange(124, 5000)),
                ]
            )
            headers = self.headers(conv, **{name: value})
            signed = ""
            if name == h.NATS_MSG_ID:
                del headers[h.ID]
                signed = "unauthenticated"  # signed: a signed message needs Mesh-Id itself
            elif name == h.REPLY_TO and not value.startswith("mesh.c.reply."):
                # signed: an agent's inbox (a wildcard at that) or a JetStream API subject is
                # not in the reply space of the signer (a role: replies and events), and no
                # grant of its owner came with it; a reply subject too long is a role's own
                # and meets the header check
                signed = "unauthorized"
            self.add(
                f"mesh.{conv}.agent.echo", b'{"text":"x"}', headers, "echo", "bad_header", signed_kind=signed
            )
        elif pick == 5:  # no Mesh-Type on an inbox; a type nobody handles; a mismatched event
            headers = self.headers(conv)
            choice = r.randrange(3)
            if choice == 0:
                del headers[h.TYPE]
                self.add(f"mesh.{conv}.agent.echo", b'{"text":"x"}', headers, "echo", "bad_header")
            elif choice == 1:
                headers[h.TYPE] = "test.nobody_handles_this"
                self.add(f"mesh.{conv}.agent.echo", b'{"text":"x"}', headers, "echo", "unknown_type")
            else:
                headers[h.TYPE] = "test.pong"
                self.add(f"mesh.{conv}.evt.test.ping", b'{"text":"x"}', headers, "echo", "bad_header")
        elif pick == 6:  # a subject whose conversation token breaks the rules
            token = r.choice(["a:b", "ünï", "x" * r.randrange(129, 3800), "a%b", "(", "'"])
            where = r.choice(["agent.echo", "direct.echo", "evt.test.ping"])
            self.add(f"mesh.{token}.{where}", b'{"text":"x"}', self.headers(conv), "echo", "bad_subject")
        elif pick == 7:  # a subject that is not UTF-8
            token = b"\xff" + r.randbytes(r.randrange(0, 20)).replace(b".", b"").replace(b" ", b"")
            token = bytes(c for c in token if c > 0x20 and c not in b".*>")
            where = r.choice([b"agent.echo", b"direct.echo", b"evt.test.ping"])
            subject = b"mesh." + (token or b"\xff") + b"." + where
            self.add(subject, b'{"text":"x"}', self.headers(conv), "echo", "bad_subject")
        elif pick == 8:  # a timer that is no timer, or for a join that does not exist
            # as if the agent sent it: a timer from anyone else is refused before its join is
            # looked up (unauthorized, tests/test_approval.py); signed, with the agent's own key
            # (a compromised agent), which alone may publish on its timer subject
            headers = self.headers(conv, "mesh.join_timer", **{h.SENDER: "coordinator"})
            choice = r.randrange(4)
            if choice == 0:
                data, kind = b"{not a timer", "decode"
            elif choice == 1:
                data, kind = b'{"join": 5, "due_ms": "x"}', "validation"
            else:
                join = r.choice(["NoSuchJoin", "*", ">", "a.b", "j" * 300])
                data, kind = msgspec.json.encode(JoinTimer(join=join, due_ms=1)), "unknown_join"
            self.add(
                f"mesh.{conv}.timer.coordinator",
                data,
                headers,
                "coordinator",
                kind,
                signer="agent:coordinator",
            )
        elif pick == 9:  # an answer to a join that does not exist, or with a wildcard in it
            tail = r.choice(["*/0", ">/1", "NoSuchJoin/0", "NoSuchJoin/timer", "x/judge", ""])
            answer = "coordinator." + tail
            headers = self.headers(conv, "test.work_done", **{h.ANSWER: answer})
            body = b'{"text": "t", "n": 0, "answer": "a", "by": 1}'
            self.add(f"mesh.{conv}.agent.coordinator", body, headers, "coordinator", "unknown_join")
        elif pick == 10:  # a request (direct, with a reply subject) that cannot be handled
            data, kind = self.body()
            headers = self.headers(conv)
            if kind == "validation_msgpack":
                headers[h.CONTENT_TYPE] = "application/msgpack"
                kind = "validation"
            self.add(f"mesh.{conv}.direct.echo", data, headers, "echo", kind)
            self.made[-1].reply = True
        elif pick == 11:  # a deadline long gone, a hop count past the limit
            name, value, kind = r.choice([(h.DEADLINE, "1", "deadline_expired"), (h.HOP, "99", "hop_limit")])
            headers = self.headers(conv, **{name: value})
            self.add(f"mesh.{conv}.agent.echo", b'{"text":"x"}', headers, "echo", kind)
        elif pick == 12:  # subjects no agent takes: replies to nobody, dead letters, unknown kinds
            # (on a secured mesh the server refuses them: the publisher role may not publish there)
            where = r.choice([f"reply.{r.randrange(10**6)}", "dlq.nobody", "nothing.echo"])
            self.add(f"mesh.{conv}.{where}", r.randbytes(20), self.headers(conv), "", "")
        else:  # an event of a type no running agent handles
            self.add(f"mesh.{conv}.evt.test.unheard", b"{", self.headers(conv, "test.unheard"), "", "")


def corpus() -> list[Bad]:
    """The sweep's bad messages: the same every run (a fixed seed)."""
    sweep = Sweep(random.Random(1234))
    for _ in range(BAD):
        sweep.one()
    return sweep.made


def _spawn_fleet(procs: list[subprocess.Popen[bytes]], settings: Settings, logs: Path) -> None:
    for spec, replicas in [(ECHO, 2), (f"{HANDOFFS}:coordinator", 1), (f"{HANDOFFS}:worker", 2)]:
        for i in range(replicas):
            log = logs / f"{spec.rsplit(':', 1)[-1]}-{i}.log"
            procs.append(spawn_agent(spec, settings, log=log, env=AGENT_ENV))


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    # Insecure (an opt-out, on purpose): unsigned hostile bytes meet the checks past
    # verification as they are. The secured run is the test after it.
    with nats_server(tmp_path / "nats") as srv:
        yield srv


@pytest.fixture
async def fleet(own_server: EmbeddedServer, tmp_path: Path) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    settings = Settings.load(environ={}, nats_url=own_server.url, data_dir=tmp_path / "data", insecure=True)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _spawn_fleet(procs, settings, tmp_path)
        yield procs
    finally:
        for p in procs:
            stop_process(p, timeout=10)
        await ho.close_ledger()


@pytest.fixture
def secure_server(tmp_path: Path) -> Iterator[SecureServer]:
    """A server of the test's own (its dead letters are counted in the stream), requiring
    authentication as `mesh up` starts it."""
    with secure_nats_server(tmp_path / "nats") as srv:
        yield srv


@pytest.fixture
async def secure_fleet(
    secure_server: SecureServer, tmp_path: Path
) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """The same fleet, each agent process on its own identity (`mesh run` provisions it
    from the server recorded under the data dir, as on the machine that ran `mesh up`)."""
    await secure_server.prepare()
    settings = secure_server.local(
        Settings.load(environ={}, data_dir=tmp_path / "data", trace_exporter="none")
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _spawn_fleet(procs, settings, tmp_path)
        yield procs
    finally:
        for p in procs:
            stop_process(p, timeout=10)
        await ho.close_ledger()


async def _raw_publish(
    url: str, bad: list[Bad], *, creds: Settings | None = None, inbox: str = "_INBOX.sweep"
) -> list[bytes]:
    """Publish with a bare socket: a real client would refuse some of these bytes. With
    `creds`, connected on their identity (a signature, if any, is in the headers already);
    a request's reply subject is under `inbox`. The server's -ERR lines: a publish that the
    identity may not make is refused, and the connection goes on."""
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port), limit=1 << 20)
    info = await reader.readline()  # INFO
    options = {"verbose": False, "pedantic": False, "headers": True}
    if creds is not None:
        writer.write(raw_connect(info, creds, **options))
    else:
        writer.write(b"CONNECT " + json.dumps(options).encode() + b"\r\n")
    errors: list[bytes] = []

    async def read() -> None:  # until the PONG after the last publish: the server took them all
        while not (line := await reader.readline()).startswith(b"PONG"):
            if not line:
                raise ConnectionError(f"the server closed the connection: {errors[-3:]}")
            if line.startswith(b"-ERR"):
                errors.append(line.strip())

    reading = asyncio.create_task(read())  # read while writing: refusals come meanwhile
    try:
        for i, b in enumerate(bad):
            block = (
                b"NATS/1.0\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in b.headers.items()) + b"\r\n"
            )
            reply = f" {inbox}.{i}" if b.reply else ""
            writer.write(
                b"HPUB "
                + b.subject
                + reply.encode()
                + b" %d %d\r\n" % (len(block), len(block) + len(b.data))
                + block
                + b.data
                + b"\r\n"
            )
            if i % 100 == 0:
                await writer.drain()
        writer.write(b"PING\r\n")
        await writer.drain()
        await asyncio.wait_for(reading, 60)
    finally:
        reading.cancel()
        writer.close()
    return errors


def _signed(bad: list[Bad], signers: dict[str, Signer]) -> list[Bad]:
    """`bad` as its signer sends it on a secured mesh: with the time it is sent (unless the
    corpus set a Mesh-Sent-At of its own) and signed, over the subject as the receiver reads
    it (a byte that is not UTF-8 escaped, docs/protocol.md: so verification passes, and the
    subject check after it refuses)."""
    now = str(h.now_ns())
    out = []
    for b in bad:
        headers = {h.SENT_AT: now, **b.headers}
        signers[b.signer].sign(b.subject.decode(errors="backslashreplace"), headers, b.data)
        out.append(replace(b, headers=headers))
    return out


def _fresh_ids(headers: dict[str, str]) -> dict[str, str]:
    """The same headers under ids not used before: the inbox stream would drop a message
    whose Nats-Msg-Id it stored within its dedupe window, unseen by any agent."""
    return {k: f"raw-{v}" if k in (h.ID, h.NATS_MSG_ID) else v for k, v in headers.items()}


def _permits(patterns: Iterable[str], subject: bytes) -> bool:
    """Whether publish permissions `patterns` (nats-server subject patterns) allow `subject`."""
    tokens = subject.split(b".")
    for pattern in patterns:
        want = pattern.encode().split(b".")
        for i, w in enumerate(want):
            if w == b">":
                if len(tokens) > i:
                    return True
                break
            if i >= len(tokens) or (w != b"*" and w != tokens[i]):
                break
        else:
            if len(want) == len(tokens):
                return True
    return False


async def good_traffic(client: MeshClient, n: int, prefix: str) -> int:
    """`n` good conversations: a request to echo, an event for it, a fan-out by the
    coordinator to the workers; how many requests were answered right."""
    answered = 0
    for i in range(n):
        conv = f"{prefix}{i}"
        ping = Ping(text=f"g{i}", n=i)
        got = await client.request("echo", ping, Pong, timeout=20, conversation=conv)
        answered += got.n == i
        await client.publish(Ping(text=f"e{i}", n=i), conversation=conv)
        await client.send("coordinator", ho.Task(text=f"t{i}", workers=2), conversation=conv)
        await asyncio.sleep(0.05)
    return answered


def _letters(msgs: list[Any]) -> list[Any]:
    return [m for m in msgs if m.headers and h.DLQ_KIND in m.headers and h.DLQ_AGENT in m.headers]


@dataclass
class Watch:
    """What the sweep watches: dead letters, the answers to bad requests, the results of the
    good conversations (pongs, fan-out summaries)."""

    letters: Recorder
    answers: Recorder
    summaries: Recorder
    pongs: Recorder

    @classmethod
    async def start(cls, transport: Any, answers: str) -> Watch:
        return cls(
            await Recorder.start(transport, "mesh.*.dlq.*"),
            await Recorder.start(transport, answers),
            await Recorder.start(transport, "mesh.*.evt.test.summary"),
            await Recorder.start(transport, "mesh.*.evt.test.pong"),
        )

    async def check(
        self,
        client: MeshClient,
        fleet: list[subprocess.Popen[bytes]],
        *,
        expected: Counter[tuple[str, str]],
        requests: Counter[str],
        good: int,
        answered: int,
        more: str = "",
    ) -> None:
        """Wait for every dead letter, answer and good result expected, then assert that
        they are exactly these and that every agent process is alive and answers."""
        reaching = sum(expected.values())
        await self.letters.wait_for(lambda msgs: len(_letters(msgs)) >= reaching, timeout=120)
        await self.summaries.wait_for(lambda msgs: len(msgs) >= good, timeout=60)
        await self.pongs.wait_for(lambda msgs: len(msgs) >= good, timeout=60)
        await self.answers.wait_for(lambda msgs: len(msgs) >= requests.total(), timeout=60)
        await asyncio.sleep(1)  # anything extra would show now

        got = _letters(self.letters.messages)
        seen = Counter((m.headers[h.DLQ_AGENT], m.headers[h.DLQ_KIND]) for m in got)
        no_reason = [m for m in got if not m.headers.get(h.DLQ_REASON)]
        answers = [msgspec.json.decode(m.data) for m in self.answers.messages]
        instances = await discover(client.transport, timeout=2)
        alive = Counter(a.name for a in instances)
        dead_processes = [p.args for p in fleet if p.poll() is not None]
        stored = await _stored_letters(client)
        print(
            f"\nreaching agents={reaching} dead-lettered={len(got)} stored letters={stored} "
            f"requests answered with a reason={len(answers)}/{requests.total()} "
            f"good requests={answered}/{good} "
            f"good events={len(self.pongs.messages)}/{good} fan-outs={len(self.summaries.messages)}/{good} "
            f"agents answering discovery={dict(alive)} processes died={len(dead_processes)}{more}"
        )
        print("by (agent, kind):", dict(sorted(seen.items())))
        assert not dead_processes
        assert alive == {"echo": 2, "coordinator": 1, "worker": 2}
        assert (answered, len(self.pongs.messages), len(self.summaries.messages)) == (good, good, good)
        assert seen == expected, f"missing {expected - seen}, unexpected {seen - expected}"
        assert stored == reaching
        assert not no_reason
        assert all(a["reason"] and a["kind"] for a in answers)
        assert Counter(a["kind"] for a in answers) == requests
        for rec in (self.letters, self.answers, self.summaries, self.pongs):
            await rec.stop()


@pytest.mark.xdist_group("heavy")  # one worker runs these one after another (Makefile)
async def test_thousands_of_bad_messages_silence_no_agent_and_each_is_dead_lettered(
    own_server: EmbeddedServer, fleet: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    settings = Settings.load(environ={}, nats_url=own_server.url, data_dir=tmp_path / "client", insecure=True)
    bad = corpus()
    print(f"\nbad sent={len(bad)}", end="")
    async with MeshClient(await _transport(settings), "sweep") as client:
        await wait_for_agents(client.transport, {"echo": 2, "coordinator": 1, "worker": 2}, timeout=60)
        watch = await Watch.start(client.transport, "_INBOX.sweep.*")
        traffic = asyncio.create_task(good_traffic(client, GOOD, "good"))
        for start in range(0, len(bad), 400):  # in slices, so good traffic interleaves
            assert await _raw_publish(own_server.url, bad[start : start + 400]) == []
            await asyncio.sleep(0.1)
        answered = await asyncio.wait_for(traffic, 120)
        await watch.check(
            client,
            fleet,
            expected=Counter((b.agent, b.kind) for b in bad if b.agent),
            requests=Counter(b.kind for b in bad if b.reply),
            good=GOOD,
            answered=answered,
        )


async def test_on_a_secured_mesh_signed_bad_messages_meet_the_same_checks_and_unsigned_ones_are_refused(
    secure_server: SecureServer, secure_fleet: list[subprocess.Popen[bytes]]
) -> None:
    own = secure_server
    bad = corpus()
    watcher = await MeshClient.connect(own.role("operator"), "sweep-watch")  # reads dead letters
    client = await MeshClient.connect(own.role("publisher"), "sweep")  # the good traffic
    try:
        await wait_for_agents(watcher.transport, {"echo": 2, "coordinator": 1, "worker": 2}, timeout=60)
        with own.keyring.locked() as keyring:  # each agent's identity is issued by now
            publish = {u.identity: u.permissions.publish for u in keyring.users}
        signers = {
            who: Signer(read_seed(own.keyring.creds_path(who))) for who in sorted({b.signer for b in bad})
        }
        watch = await Watch.start(watcher.transport, f"_INBOX.{signers[PUBLISHER].public_key}.sweep.*")
        unanswered = await Recorder.start(watcher.transport, "_INBOX.sweep.raw.*")

        # (a) the corpus signed, each message by its signer, on its signer's connection
        traffic = asyncio.create_task(good_traffic(client, GOOD, "good"))
        refused: list[bytes] = []
        for start in range(0, len(bad), 400):  # in slices, so good traffic interleaves
            part = bad[start : start + 400]
            for who, signer in signers.items():
                mine = _signed([b for b in part if b.signer == who], signers)
                inbox = f"_INBOX.{signer.public_key}.sweep"  # a request's reply: the signer's own
                refused += await _raw_publish(own.url, mine, creds=own.identity(who), inbox=inbox)
            await asyncio.sleep(0.1)
        answered = await asyncio.wait_for(traffic, 120)

        # (b) a sample unsigned, by a compromised agent on its own valid credentials; then
        # the good traffic again
        raw = [replace(b, headers=_fresh_ids(b.headers)) for b in random.Random(5678).sample(bad, RAW)]
        refused_raw = await _raw_publish(
            own.url, raw, creds=own.identity(COMPROMISED), inbox="_INBOX.sweep.raw"
        )
        answered += await good_traffic(client, AFTER, "after")

        signed = Counter(
            (b.agent, b.signed_kind or b.kind)
            for b in bad
            if b.agent and _permits(publish[b.signer], b.subject)
        )
        unsigned = Counter(
            (b.agent, UNAUTHENTICATED) for b in raw if b.agent and _permits(publish[COMPROMISED], b.subject)
        )
        differences = Counter((b.kind, b.signed_kind) for b in bad if b.signed_kind)
        await watch.check(
            watcher,
            secure_fleet,
            expected=signed + unsigned,
            # an unauthenticated or unauthorized request is not answered: its reply subject
            # may be someone else's
            requests=Counter(b.signed_kind or b.kind for b in bad if b.reply and not b.signed_kind),
            good=GOOD + AFTER,
            answered=answered,
            more=(
                f"\nsigned: sent={len(bad)} reaching agents={signed.total()} "
                f"refused by the server={len(refused)}"
                f" kinds changed by verification={dict(differences)}"
                f"\nunsigned: sent={len(raw)} reaching agents={unsigned.total()} refused by the server="
                f"{len(refused_raw)} answered={len(unanswered.messages)}"
            ),
        )
        assert len(refused) == sum(not _permits(publish[b.signer], b.subject) for b in bad)
        assert len(refused_raw) == sum(not _permits(publish[COMPROMISED], b.subject) for b in raw)
        assert all(e.startswith(b"-ERR 'Permissions Violation for Publish") for e in refused + refused_raw)
        assert unsigned.total() and refused_raw and differences  # the sample has each case
        assert not unanswered.messages
        await unanswered.stop()
    finally:
        await client.close()
        await watcher.close()


async def _transport(settings: Settings) -> Any:
    from mesh.transport.nats import NatsTransport

    return await NatsTransport.connect(settings, "sweep")


async def _stored_letters(client: MeshClient) -> int:
    js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
    total = 0
    for agent in ("echo", "coordinator", "worker"):
        info = await js.stream_info("MESH_DLQ", subjects_filter=f"mesh.*.dlq.{agent}")
        total += sum((info.state.subjects or {}).values())
    return total
