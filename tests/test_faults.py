"""Fault tests: real agent processes and a real nats-server of their own, on loopback,
killed and restarted on purpose. Each test counts every effect by key, prints the counts,
and fails on a single lost or doubled one.

Effects are counted where they can be seen from outside: final results in the stored
events stream (one stream subject per conversation, so a duplicate shows as a count of 2)
and side effects in an external ledger keyed by the handlers' idempotency keys, whose
values name stage and conversation (an unstable key would show as a second entry).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLES
from sample_agents import handoffs as ho
from sample_agents.echo import Ping

from mesh.observability import history
from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import Recorder, SecureServer, secure_nats_server, spawn_agent, stop_process
from mesh.transport import streams
from mesh.transport.identities import with_role
from mesh.transport.server import EmbeddedServer
from mesh.wire import envelope as h
from mesh.wire.settings import Settings
from mesh.wire.subjects import Address

pytestmark = pytest.mark.slow

HANDOFFS = SAMPLES / "handoffs.py"
ECHO = f"{SAMPLES / 'echo.py'}:agent"
FLEET_ENV = {
    "MESH_ACK_WAIT": "2",  # a killed handler's message is redelivered 2 s later
    "MESH_MAX_DELIVER": "10",
    "MESH_RETRY_BACKOFF": "0.05",
    "MESH_LOG_LEVEL": "warning",
    "MESH_TRACE_EXPORTER": "none",
}


class Fleet:
    """Agent processes kept at a count: kill -9 on demand, revive the dead."""

    def __init__(self, settings: Settings, logs: Path, env: dict[str, str]) -> None:
        self.settings = settings
        self.logs = logs
        self.env = {**FLEET_ENV, **env}
        self.procs: dict[str, list[tuple[subprocess.Popen[bytes], str, dict[str, str]]]] = {}
        self.deaths: Counter[str] = Counter()
        self._spawned = 0

    def start(self, name: str, replicas: int = 1, spec: str | None = None, **env: str) -> None:
        spec = spec or f"{HANDOFFS}:{name}"
        for _ in range(replicas):
            self._spawned += 1
            log = self.logs / f"{name}-{self._spawned}.log"
            proc = spawn_agent(spec, self.settings, log=log, env={**self.env, **env})
            self.procs.setdefault(name, []).append((proc, spec, env))

    def alive(self, name: str) -> list[subprocess.Popen[bytes]]:
        return [p for p, _, _ in self.procs.get(name, []) if p.poll() is None]

    def exited(self, name: str) -> list[subprocess.Popen[bytes]]:
        return [p for p, _, _ in self.procs.get(name, []) if p.poll() is not None]

    def kill(self, name: str) -> None:
        for p in self.alive(name):
            p.send_signal(signal.SIGKILL)
            p.wait()

    def kill_one(self, rng: random.Random, names: list[str]) -> None:
        victim = rng.choice([p for n in names for p in self.alive(n)])
        victim.send_signal(signal.SIGKILL)
        victim.wait()

    def revive(self, names: list[str]) -> int:
        """Replace every dead process of `names` with a new one; how many were dead."""
        revived = 0
        for name in names:
            for entry in list(self.procs.get(name, [])):
                proc, spec, env = entry
                if proc.poll() is not None:
                    self.procs[name].remove(entry)
                    self.deaths[name] += 1
                    self.start(name, spec=spec, **env)
                    revived += 1
        return revived

    def stop(self) -> None:
        for entries in self.procs.values():
            for p, _, _ in entries:
                stop_process(p, timeout=10)


RESTARTED: list[EmbeddedServer] = []  # servers a test restarted: stopped after its clients


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[SecureServer]:
    """A server of the test's own (one test kills it), authentication on as `mesh up` starts it."""
    with secure_nats_server(tmp_path / "nats") as srv:
        yield srv
    while RESTARTED:
        RESTARTED.pop().stop()


@pytest.fixture
async def fault_settings(own_server: SecureServer, tmp_path: Path) -> Settings:
    """As on the machine that ran `mesh up`: each agent process gets its own identity."""
    await own_server.prepare()
    return own_server.local(Settings.load(environ={}, data_dir=tmp_path / "data", trace_exporter="none"))


@pytest.fixture
async def fleet(fault_settings: Settings, tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(fault_settings, tmp_path / "logs", {})
    try:
        yield f
    finally:
        f.stop()
        await ho.close_ledger()


@pytest.fixture
async def mc(fault_settings: Settings) -> AsyncIterator[MeshClient]:
    # the operator: the tests read dead letters and the streams' stored messages
    c = await MeshClient.connect(with_role(fault_settings, "operator"), "fault-test")
    try:
        yield c
    finally:
        await c.close()


async def subject_counts(client: MeshClient, stream: str, pattern: str) -> Counter[str]:
    """How many stored messages each subject matching `pattern` has (duplicates count)."""
    js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
    info = await js.stream_info(stream, subjects_filter=pattern)
    return Counter(info.state.subjects or {})


async def ledger(client: MeshClient) -> Counter[str]:
    """Applied side effects, as 'stage conversation' -> how many times."""
    from nats.js.errors import NotFoundError

    js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
    stream, prefix = f"KV_{ho.LEDGER}", f"$KV.{ho.LEDGER}."
    async with asyncio.timeout(30):  # right after a cluster regains quorum, reads can time out
        while True:
            try:
                # the keys from the stream leader's own count (kv.keys() can come back empty
                # from a consumer made while a new leader catches up)
                info = await js.stream_info(stream, subjects_filter=prefix + ">")
                kv = await js.key_value(ho.LEDGER)
                keys = [subject.removeprefix(prefix) for subject in info.state.subjects or {}]
                return Counter([(await kv.get(k)).value.decode() for k in keys])
            except NotFoundError:
                return Counter()  # no ledger: nothing was ever applied
            except Exception:  # a timeout or no leader yet: read again, never report "no effects"
                await asyncio.sleep(0.5)


async def wait_until(predicate: Any, timeout: float, every: float = 0.25) -> None:
    """Poll `predicate` (state in another process or in a stream: nothing to wait on here)."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(every)


@pytest.mark.xdist_group("heavy")  # one worker runs these one after another (Makefile)
async def test_kill_9_workers_mid_handler_loses_and_doubles_nothing(
    fault_settings: Settings, mc: MeshClient, fleet: Fleet
) -> None:
    """300 conversations through stage_a -> stage_b -> stage_c, two replicas each. Replicas
    kill themselves right after their side effect (before answering and acking) on about
    one first delivery in 60, and a killer SIGKILLs a random replica every 1.5 s."""
    stages = ["stage_a", "stage_b", "stage_c"]
    for s in stages:
        fleet.start(s, 2, HANDOFF_CRASH_EVERY="60")
    await wait_for_agents(mc.transport, dict.fromkeys(stages, 2), timeout=60)
    rng = random.Random(3)
    n = 300
    convs = [f"kill-{i}" for i in range(n)]
    kills = 0
    stop_killing = asyncio.Event()

    async def killer() -> None:
        nonlocal kills
        while not stop_killing.is_set():
            await asyncio.sleep(1.5)
            fleet.kill_one(rng, stages)
            kills += 1

    async def reviver() -> None:
        while True:
            await asyncio.sleep(0.3)
            fleet.revive(stages)

    tasks = [asyncio.create_task(killer()), asyncio.create_task(reviver())]
    try:
        accepted = []
        for c in convs:
            await mc.send("stage_a", ho.Chain(conversation=c, work_ms=20), conversation=c, route=stages[1:])
            accepted.append(c)
            await asyncio.sleep(0.02)  # spread over ~6 s, so kills land throughout
        await asyncio.sleep(2)
        stop_killing.set()

        async def all_done() -> bool:
            done = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.chain_done")
            return len(done) >= n

        await wait_until(all_done, timeout=120)
        await asyncio.sleep(3)  # one more ack-wait: late duplicates would show now
    finally:
        for t in tasks:
            t.cancel()
    done = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.chain_done")
    effects = await ledger(mc)
    dead = await subject_counts(mc, fault_settings.dead_letter_stream, "mesh.*.dlq.>")
    finished = {s.split(".")[1]: k for s, k in done.items()}
    lost = [c for c in accepted if c not in finished]
    doubled = {c: k for c, k in finished.items() if k != 1}
    effect_problems = {
        f"{s} {c}": effects[f"{s} {c}"] for c in accepted for s in stages if effects[f"{s} {c}"] != 1
    }
    deaths = sum(fleet.deaths.values())
    print(
        f"\naccepted={len(accepted)} completed={len(finished)} lost={len(lost)} doubled={len(doubled)} "
        f"effects={sum(effects.values())} (expected {3 * n}) bad_effects={len(effect_problems)} "
        f"external_kills={kills} process_deaths={deaths} dead_letters={sum(dead.values())}"
    )
    assert not lost, f"lost: {lost[:10]}"
    assert not doubled, f"doubled: {list(doubled.items())[:10]}"
    assert not effect_problems, f"effects applied other than once: {list(effect_problems.items())[:10]}"
    assert sum(dead.values()) == 0
    assert kills >= 3 and deaths > kills, "the run must include external kills and self-inflicted crashes"
    # and the record holds every conversation whole, though handlers died mid-handling: a
    # handling's entry goes with its delivery's acknowledgement, so a lost one is written again
    unwhole = []
    for c in accepted:
        msgs = await history.conversation(mc.transport, c)
        types = sorted(m.type for m in msgs)
        if (
            types != ["test.chain"] * 3 + ["test.chain_done"]
            or history.summarize(c, msgs).status != history.DONE
        ):
            unwhole.append((c, [(m.type, [d.outcome for d in m.deliveries]) for m in msgs]))
    assert not unwhole, f"{len(unwhole)} conversations not recorded whole: {unwhole[:3]}"


@pytest.mark.xdist_group("heavy")  # one worker runs these one after another (Makefile)
async def test_killing_and_restarting_nats_server_loses_no_acknowledged_event(
    own_server: SecureServer, fault_settings: Settings, mc: MeshClient, fleet: Fleet
) -> None:
    """300 events published while the server (file store) is killed with SIGKILL and
    started again: every event the server acknowledged is stored once and handled once."""
    fleet.start("echo", 1, spec=ECHO)
    await wait_for_agents(mc.transport, {"echo": 1}, timeout=30)
    port = int(own_server.url.rsplit(":", 1)[1])
    n, acked, retries = 300, [], 0

    async def publish_until_acked(i: int) -> None:
        nonlocal retries
        conv = f"rs-{i}"
        data = mc.codec.encode(Ping(text="restart", n=i))
        headers = mc.headers("test.ping", 1, conv)  # one id: retries are deduplicated
        async with asyncio.timeout(60):
            while True:
                try:
                    await mc.send_raw(Address.event(conv, "test.ping").subject, data, headers, store=True)
                    acked.append(i)
                    return
                except Exception:
                    retries += 1
                    await asyncio.sleep(0.2)

    try:
        for i in range(n):
            if i == 100:
                own_server.server.kill()  # kill -9: no chance to flush anything
                await asyncio.sleep(0.5)
                srv = EmbeddedServer(own_server.server.directory, port=port, auth=own_server.server.auth)
                RESTARTED.append(srv)
                await asyncio.to_thread(srv.start)
            await publish_until_acked(i)

        async def all_handled() -> bool:
            return len(await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.pong")) >= n

        await wait_until(all_handled, timeout=90)
        await asyncio.sleep(2)
        reconnects = mc.transport.nc.stats["reconnects"]  # type: ignore[attr-defined]
        pings = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.ping")
        pongs = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.pong")
    finally:
        fleet.stop()
    stored = {s.split(".")[1]: k for s, k in pings.items()}
    handled = {s.split(".")[1]: k for s, k in pongs.items()}
    lost = [i for i in acked if f"rs-{i}" not in stored]
    unhandled = [i for i in acked if f"rs-{i}" not in handled]
    doubled = {c: k for c, k in {**stored, **handled}.items() if k != 1}
    print(
        f"\nacked={len(acked)} publish_retries={retries} reconnects={reconnects} stored={len(stored)} "
        f"handled={len(handled)} lost={len(lost)} unhandled={len(unhandled)} doubled={len(doubled)}"
    )
    assert reconnects >= 1, "the publisher must have lived through the restart"
    assert len(acked) == n and not lost and not unhandled and not doubled


@pytest.mark.xdist_group("heavy")  # one worker runs these one after another (Makefile)
async def test_kill_9_the_fan_in_holder_and_another_replica_completes(
    fault_settings: Settings, mc: MeshClient, fleet: Fleet
) -> None:
    """A parallel and a hierarchical conversation: the coordinator and the supervisor are
    killed after fanning out; new replicas take over, and the first of them to run each
    completion is killed in the middle of it too. Both conversations complete, once."""
    fleet.start("worker", 1)
    fleet.start("lead", 1)
    fleet.start("coordinator", 1)
    fleet.start("supervisor", 1)
    await wait_for_agents(
        mc.transport, dict.fromkeys(["worker", "lead", "coordinator", "supervisor"], 1), timeout=60
    )
    tap = await Recorder.start(mc.transport, "mesh.*.agent.worker")
    await mc.send("coordinator", ho.Task(text="par", workers=3, work_ms=400), conversation="holder-par")
    await mc.send("supervisor", ho.Task(text="hier", work_ms=400), conversation="holder-hier")
    await tap.wait_for(lambda ms: {m.subject.split(".")[1] for m in ms} >= {"holder-par", "holder-hier"}, 30)
    fleet.kill("coordinator")
    fleet.kill("supervisor")
    # the answers now wait in the dead holders' inboxes; the state waits in KV
    fleet.start("coordinator", 2, HANDOFF_CRASH_COMPLETION="1")
    fleet.start("supervisor", 2, HANDOFF_CRASH_COMPLETION="1")

    async def both_done() -> bool:
        got = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.summary")
        return {"mesh.holder-par.evt.test.summary", "mesh.holder-hier.evt.test.summary"} <= set(got)

    await wait_until(both_done, timeout=60)
    await asyncio.sleep(3)
    summaries = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.summary")
    effects = await ledger(mc)
    crashed = [p.returncode for n in ("coordinator", "supervisor") for p in fleet.exited(n)]
    print(f"\nsummaries={dict(summaries)} effects={dict(effects)} killed_in_completion={len(crashed)}")
    assert summaries == Counter(
        {"mesh.holder-par.evt.test.summary": 1, "mesh.holder-hier.evt.test.summary": 1}
    )
    assert effects["coordinator holder-par"] == 1 and effects["supervisor holder-hier"] == 1
    assert len(crashed) >= 4  # the two first holders, and one replica of each in its completion


async def test_poison_is_retried_with_backoff_then_dead_lettered_while_traffic_flows(
    fault_settings: Settings, mc: MeshClient, fleet: Fleet
) -> None:
    backoff, max_deliver = 0.2, 4
    fleet.start("fragile", 1, MESH_MAX_DELIVER=str(max_deliver), MESH_RETRY_BACKOFF=str(backoff))
    await wait_for_agents(mc.transport, {"fragile": 1}, timeout=30)
    dlq = await Recorder.start(mc.transport, "mesh.*.dlq.fragile")
    done = await Recorder.start(mc.transport, "mesh.poison.evt.test.work_done")
    await mc.send("fragile", ho.Work(text="poison", n=-1), conversation="poison")
    inbox = Address.inbox("poison", "fragile").subject
    await mc.send_raw(inbox, b"\xff not json", mc.headers("test.work", 1, "poison"), store=True)
    for i in range(50):
        await mc.send("fragile", ho.Work(text="fine", n=i), conversation="poison")
    healthy = await done.wait_count(50, timeout=30)
    dead = await dlq.wait_count(2, timeout=30)
    by_kind = {m.headers[h.DLQ_KIND]: m for m in dead}
    poison, garbage = by_kind["handler_error"], by_kind["decode"]
    history = json.loads(poison.headers[h.DLQ_HISTORY])
    gaps = [(b["at_ns"] - a["at_ns"]) / 1e9 for a, b in itertools.pairwise(history)]
    print(f"\nhealthy={len(healthy)} dead={sorted(by_kind)} deliveries={len(history)} gaps_s={gaps}")
    assert poison.headers[h.DLQ_DELIVERIES] == str(max_deliver)
    assert [e["n"] for e in history] == list(range(1, max_deliver + 1))
    assert all("poisoned" in e["error"] for e in history)
    for n, gap in enumerate(gaps, start=1):  # the server held each retry back at least this long
        assert gap >= 0.8 * backoff * 2 ** (n - 1) * 0.95, (n, gap)
    assert h.DLQ_DELIVERIES not in garbage.headers  # undecodable: dead-lettered at once
    assert garbage.data == b"\xff not json"


async def test_a_handler_that_crashes_its_process_every_time_is_dead_lettered(
    fault_settings: Settings, mc: MeshClient, fleet: Fleet
) -> None:
    """No replica ever acknowledges it: the delivery after the last allowed one is
    dead-lettered, with the history, without running the handler again."""
    env = {"MESH_MAX_DELIVER": "2", "MESH_ACK_WAIT": "1", "HANDOFF_CRASH_ALWAYS": "1"}
    fleet.start("stage_a", 1, **env)
    await wait_for_agents(mc.transport, {"stage_a": 1}, timeout=30)
    dlq = await Recorder.start(mc.transport, "mesh.crashy.dlq.stage_a")
    await mc.send("stage_a", ho.Chain(conversation="crashy"), conversation="crashy")

    async def revived_dead_letter() -> bool:
        fleet.revive(["stage_a"])
        return bool(dlq.messages)

    await wait_until(revived_dead_letter, timeout=60, every=0.3)
    [dead] = dlq.messages
    print(f"\ndeaths={fleet.deaths['stage_a']} kind={dead.headers[h.DLQ_KIND]}")
    assert dead.headers[h.DLQ_KIND] == "max_deliveries"
    assert dead.headers[h.DLQ_DELIVERIES] == "2"
    assert fleet.deaths["stage_a"] >= 1


async def test_an_expired_deadline_stops_downstream_work(
    fault_settings: Settings, mc: MeshClient, fleet: Fleet
) -> None:
    stages = ["stage_a", "stage_b", "stage_c"]
    for s in stages:
        fleet.start(s, 1)
    await wait_for_agents(mc.transport, dict.fromkeys(stages, 1), timeout=30)
    dlq = await Recorder.start(mc.transport, "mesh.late-1.dlq.>")
    done = await Recorder.start(mc.transport, "mesh.*.evt.test.chain_done")
    # stage_a takes 0.8 s of a 0.4 s budget: it is stopped when the deadline passes, before its
    # side effect, and nothing goes downstream
    await mc.send(
        "stage_a",
        ho.Chain(conversation="late-1", work_ms=800),
        conversation="late-1",
        route=stages[1:],
        deadline=0.4,
    )
    await mc.send("stage_a", ho.Chain(conversation="late-0"), conversation="late-0", route=stages[1:])
    [dead] = await dlq.wait_count(1, timeout=20)
    [ok] = await done.wait_count(1, timeout=20)
    await asyncio.sleep(1)
    effects = await ledger(mc)
    print(f"\ndead={dead.subject} kind={dead.headers[h.DLQ_KIND]} effects={dict(effects)}")
    assert dead.subject == "mesh.late-1.dlq.stage_a"
    assert dead.headers[h.DLQ_KIND] == "deadline_exceeded"
    assert ok.subject == "mesh.late-0.evt.test.chain_done" and len(done.messages) == 1
    assert effects["stage_a late-1"] == 0
    assert effects["stage_b late-1"] == 0 and effects["stage_c late-1"] == 0
