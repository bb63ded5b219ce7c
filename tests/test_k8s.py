"""The Kubernetes manifests of deploy/k8s (docs/deploy.md), checked without a cluster.

- Every object is validated against the Kubernetes schemas that `kubernetes-validate`
  ships (offline, strict: an unknown field is an error). KEDA's ScaledObject is a CRD the
  core schemas lack: it is checked structurally, against KEDA's documented `nats-jetstream`
  trigger.
- The manifests agree with the code: agent specs load, every consumer an agent pulls from
  (but its timers) has a trigger on the consumer the mesh names after the agent, the
  settings are ones a mesh process accepts.
- KEDA's lag, as its nats-jetstream scaler computes it, is computed from a real
  nats-server's ``/jsz`` for a consumer made the way the mesh makes it, and equals the
  messages produced; the replica count it leads to is checked for given thresholds.
- The agents' exec probes (deploy/k8s/probe.py) run against the same real server.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import kubernetes_validate
import nats
import pytest
import yaml
from sample_agents.echo import Ping

from mesh import Agent, Context
from mesh.agent.loader import load_agent
from mesh.cli.demo import AGENT_SPECS
from mesh.testing import running_agent
from mesh.transport import streams
from mesh.transport.nats import NatsTransport
from mesh.transport.server import EmbeddedServer
from mesh.wire import subjects
from mesh.wire.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
PROBE = K8S / "probe.py"
KUBERNETES = "1.35.0"  # the schemas validated against (kubernetes-validate ships 1.x to 1.37)
KEDA_API = "keda.sh/v1alpha1"
# KEDA's nats-jetstream trigger (keda.sh/docs/scalers/nats-jetstream): required, then optional keys
JETSTREAM_REQUIRED = {"natsServerMonitoringEndpoint", "account", "stream", "consumer"}
JETSTREAM_OPTIONAL = {"lagThreshold", "activationLagThreshold", "useHttps"}
IMAGE_SITE_PACKAGES = "/usr/local/lib/python3.11/site-packages/"  # python:3.11-slim (Dockerfile)


def _kustomization() -> dict[str, Any]:
    return dict(yaml.safe_load((K8S / "kustomization.yaml").read_text()))


def _documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                yield name, doc


def _objects(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _documents() if d["kind"] == kind}


def _agent_names() -> dict[str, str]:
    """Deployment name -> the agent spec it runs (`mesh run <spec>`)."""
    out = {}
    for name, d in _objects("Deployment").items():
        container = d["spec"]["template"]["spec"]["containers"][0]
        if container["args"][0] == "run":
            out[name] = container["args"][1]
    return out


# -- the Kubernetes schemas ------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kz = _kustomization()
    listed = set(kz["resources"])
    on_disk = {str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    generated = {f for g in kz["configMapGenerator"] for f in g["files"]}
    assert generated == {"probe.py"} and PROBE.is_file()


def test_core_objects_validate_against_the_kubernetes_schemas() -> None:
    kinds = set()
    for _, doc in _documents():
        if doc["apiVersion"] == KEDA_API:
            continue
        # raises ValidationError naming the field (strict: unknown fields are errors too)
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        kinds.add(doc["kind"])
    assert {"StatefulSet", "Service", "Deployment", "PodDisruptionBudget", "ConfigMap", "Job"} <= kinds


def test_the_validator_rejects_a_broken_object() -> None:
    """The schema check is not vacuous: a misspelt field and a wrong type are refused."""
    deployment = copy.deepcopy(_objects("Deployment")["triage"])
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    pdb = copy.deepcopy(_objects("PodDisruptionBudget")["triage"])
    pdb["spec"]["selector"] = "triage"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, KUBERNETES, strict=True)


# -- NATS, Qdrant, the gateway -----------------------------------------------------------


def test_nats_is_a_three_node_jetstream_cluster() -> None:
    sts = _objects("StatefulSet")["nats"]
    assert sts["spec"]["replicas"] == 3
    assert sts["spec"]["serviceName"] == "nats-headless"
    assert _objects("Service")["nats-headless"]["spec"]["clusterIP"] == "None"
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["data"]
    conf = _objects("ConfigMap")["nats-config"]["data"]["nats.conf"]
    assert "jetstream" in conf and "store_dir: /data" in conf and "http_port: 8222" in conf
    for i in range(3):  # a route to every node, through the headless Service
        assert f"nats://nats-{i}.nats-headless:6222" in conf
    # the users of `mesh creds init` (auth.conf) sit beside nats.conf, where it includes them
    assert "include ./auth/auth.conf" in conf
    sources = sts["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
    assert {"key": "auth.conf", "path": "auth/auth.conf"} in sources[1]["secret"]["items"]


def test_qdrant_and_the_gateway() -> None:
    qdrant = _objects("StatefulSet")["qdrant"]
    assert qdrant["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "storage"
    assert _objects("Service")["qdrant"]["spec"]["ports"][0]["port"] == 6333
    gateway = _objects("Deployment")["gateway"]["spec"]["template"]["spec"]["containers"][0]
    assert gateway["args"][0] == "gateway"  # the image's entrypoint is `mesh`
    assert gateway["args"][1:3] == ["--host", "0.0.0.0"]  # reachable from its Service
    assert _objects("Service")["gateway"]["spec"]["selector"] == {"app.kubernetes.io/name": "gateway"}


def test_every_agent_and_gateway_pod_serves_its_metrics_where_prometheus_looks() -> None:
    port = _objects("ConfigMap")["mesh-config"]["data"]["MESH_METRICS_PORT"]
    assert Settings.load(environ={"MESH_METRICS_PORT": port}).metrics_port == int(port)
    for name in [*_agent_names(), "gateway"]:
        template = _objects("Deployment")[name]["spec"]["template"]
        notes = template["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == port
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == int(port)


# -- the agents ---------------------------------------------------------------------------


def test_every_demo_agent_runs_from_its_spec() -> None:
    assert _agent_names() == AGENT_SPECS
    setup = _objects("Job")["mesh-setup"]["spec"]["template"]["spec"]["containers"][0]
    assert setup["args"] == ["agents", "add", *AGENT_SPECS.values()]  # consumers before agents


def test_settings_are_ones_a_mesh_process_accepts() -> None:
    env: dict[str, str] = {}
    for config in ("mesh-config", "mesh-support-desk"):
        env.update(_objects("ConfigMap")[config]["data"])
    assert env["MESH_NATS_URL"].startswith("nats://nats-")
    assert env["MESH_QDRANT_URL"] == "http://qdrant:6333"
    # the policy rules are the package data the image installs; the path exists there only
    policy = env.pop("MESH_POLICY_FILE")
    assert policy.startswith(IMAGE_SITE_PACKAGES)
    installed = files("mesh.agents.support") / "rules.toml"
    assert installed.is_file() and policy.endswith("mesh/agents/support/rules.toml")
    for name, spec in _agent_names().items():
        container = _objects("Deployment")[name]["spec"]["template"]["spec"]["containers"][0]
        own = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        mesh_env = {k: v for k, v in {**env, **own}.items() if k.startswith(PREFIX)}
        Settings.load(environ=mesh_env)  # raises ConfigError on an unknown or bad MESH_ name
        assert own["MESH_NATS_CREDS"] == f"/creds/{load_agent(spec).name}.creds"
        assert own["PROBE_AGENT"] == load_agent(spec).name


def test_every_agent_has_probes_a_scaled_object_and_a_disruption_budget() -> None:
    scaled, budgets = _objects("ScaledObject"), _objects("PodDisruptionBudget")
    for name in _agent_names():
        deployment = _objects("Deployment")[name]
        assert "replicas" not in deployment["spec"]  # the ScaledObject's HPA owns it
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["livenessProbe"]["exec"]["command"] == ["python", "/probe/probe.py", "live"]
        assert container["readinessProbe"]["exec"]["command"] == ["python", "/probe/probe.py", "ready"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["probe"] == "/probe" and mounts["creds"] == "/creds"
        assert scaled[name]["spec"]["scaleTargetRef"]["name"] == name
        assert (
            budgets[name]["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        )
        # longer than the drain, so in-flight handlers finish on SIGTERM
        assert (
            deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > Settings().drain_timeout
        )


def test_scaled_objects_follow_the_nats_jetstream_trigger() -> None:
    for name, so in _objects("ScaledObject").items():
        assert so["apiVersion"] == KEDA_API
        spec = so["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "pollingInterval",
            "cooldownPeriod",
            "minReplicaCount",
            "maxReplicaCount",
            "triggers",
        }
        assert spec["scaleTargetRef"]["name"] == name
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "nats-jetstream"
            meta = trigger["metadata"]
            assert JETSTREAM_REQUIRED <= set(meta) <= JETSTREAM_REQUIRED | JETSTREAM_OPTIONAL
            assert all(isinstance(v, str) for v in meta.values())  # trigger metadata is strings
            assert meta["account"] == "$G"  # the server's global account: users, no accounts
            assert int(meta["lagThreshold"]) > 0 and int(meta["activationLagThreshold"]) >= 0
            host, port = meta["natsServerMonitoringEndpoint"].rsplit(":", 1)
            assert host.startswith("nats.") and port == "8222"  # the nats Service's monitor port


def test_triggers_cover_the_consumers_the_mesh_makes_for_each_agent() -> None:
    """One trigger per consumer the agent pulls from, on its stream, under the agent's name;
    not its timers (a timer waits by design until it is due: no backlog to scale on)."""
    settings = Settings.load(environ={})
    scaled = _objects("ScaledObject")
    for name, spec in _agent_names().items():
        agent = load_agent(spec)
        wanted = {
            (c.stream, c.name)
            for c in streams.agent_consumer_specs(agent, settings)
            if c.stream != streams.TIMERS
        }
        got = {(t["metadata"]["stream"], t["metadata"]["consumer"]) for t in scaled[name]["spec"]["triggers"]}
        assert got == wanted
        assert (streams.INBOX, agent.name) in got


# -- KEDA's arithmetic on a real server's consumer info -------------------------------------


def keda_lag(jsz: dict[str, Any], account: str, stream: str, consumer: str) -> int:
    """The lag KEDA's nats-jetstream scaler reports (pkg/scalers/nats_jetstream_scaler.go,
    getMaxMsgLag): for the consumer of that name in the stream of that account,
    num_pending + num_ack_pending; with no such consumer, the stream's last_seq."""
    for acc in jsz.get("account_details") or []:
        if acc["name"] != account:
            continue
        for detail in acc.get("stream_detail") or []:
            if detail["name"] != stream:
                continue
            for c in detail.get("consumer_detail") or []:
                if c["name"] == consumer:
                    return int(c["num_pending"]) + int(c["num_ack_pending"])
            return int(detail["state"]["last_seq"])
    raise LookupError(f"stream {stream} not found in account {account}")


def desired_replicas(so: dict[str, Any], lags: list[int]) -> int:
    """What the HPA that KEDA makes asks for: an AverageValue target of lagThreshold per
    trigger, ceil(lag / lagThreshold) replicas, the most over the triggers, within
    [minReplicaCount, maxReplicaCount]; 0 only when minReplicaCount is 0 and no trigger is
    active (lag above activationLagThreshold)."""
    spec = so["spec"]
    triggers = [t["metadata"] for t in spec["triggers"]]
    active = any(
        lag > int(m.get("activationLagThreshold", "0")) for m, lag in zip(triggers, lags, strict=True)
    )
    if not active and spec["minReplicaCount"] == 0:
        return 0
    wanted = max(math.ceil(lag / int(m["lagThreshold"])) for m, lag in zip(triggers, lags, strict=True))
    return min(max(wanted, int(spec["minReplicaCount"]), 1), int(spec["maxReplicaCount"]))


def _jsz(monitor_url: str, account: str) -> dict[str, Any]:
    url = f"{monitor_url}/jsz?acc={account}&consumers=true&config=true"  # KEDA's request
    with urllib.request.urlopen(url, timeout=5) as resp:
        return dict(json.load(resp))


async def test_keda_lag_is_the_backlog_of_the_agents_consumer(
    insecure_server: EmbeddedServer, insecure_settings: Settings
) -> None:
    """A consumer made as the mesh makes an agent's inbox consumer; N messages stored for
    the agent, K of them handed out and not acknowledged (a replica working on them), no
    agent running. KEDA's lag is N: the waiting ones and the unacknowledged ones.
    A server without authentication: its users are the global account $G either way."""
    assert insecure_server.info is not None and insecure_server.info.monitor_url
    assert insecure_settings.nats_url is not None
    monitor = insecure_server.info.monitor_url
    agent = f"k8s-lag-{uuid.uuid4().hex[:8]}"
    n, k = 25, 4
    transport = await NatsTransport.connect(insecure_settings, "k8s-test")
    nc = await nats.connect(insecure_settings.nats_url)
    try:
        await transport.ensure_streams()
        [inbox] = [
            c for c in streams.consumer_specs(agent, [], insecure_settings) if c.stream == streams.INBOX
        ]
        await transport.ensure_consumer(inbox)
        assert keda_lag(_jsz(monitor, "$G"), "$G", streams.INBOX, agent) == 0
        for i in range(n):
            subject = subjects.Address.inbox(f"conv-{i % 3}", agent).subject
            await transport.store(subject, b"{}", {"Nats-Msg-Id": f"{agent}-{i}"})
        # a replica's pull: K messages out, not acknowledged
        pull = await nc.jetstream().pull_subscribe_bind(durable=agent, stream=streams.INBOX)
        taken: list[Any] = []
        while len(taken) < k:
            taken += await pull.fetch(k - len(taken), timeout=5)
        jsz = await asyncio.to_thread(_jsz, monitor, "$G")
        [detail] = [
            c
            for a in jsz["account_details"]
            for s in a["stream_detail"]
            if s["name"] == streams.INBOX
            for c in s["consumer_detail"]
            if c["name"] == agent
        ]
        assert (detail["num_pending"], detail["num_ack_pending"]) == (n - k, k)  # both terms count
        assert keda_lag(jsz, "$G", streams.INBOX, agent) == n
    finally:
        await nc.close()
        await transport.close()

    triage = _objects("ScaledObject")["triage"]  # lagThreshold 10, 1 to 10 replicas
    assert [int(t["metadata"]["lagThreshold"]) for t in triage["spec"]["triggers"]] == [10, 10]
    assert desired_replicas(triage, [n, 0]) == 3  # ceil(25 / 10)
    assert desired_replicas(triage, [n, 31]) == 4  # the busier trigger decides
    assert desired_replicas(triage, [0, 0]) == 1  # minReplicaCount
    capped = copy.deepcopy(triage)
    capped["spec"]["maxReplicaCount"] = 2
    assert desired_replicas(capped, [n, 0]) == 2  # maxReplicaCount caps ceil(25 / 10)
    idle = copy.deepcopy(triage)
    idle["spec"]["minReplicaCount"] = 0
    assert desired_replicas(idle, [0, 0]) == 0  # scaled to zero when no trigger is active


# -- the probes ------------------------------------------------------------------------------


def _probe(check: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """deploy/k8s/probe.py as the kubelet runs it: its own process, only its variables."""
    base = {"PATH": os.environ.get("PATH", "")}
    return subprocess.run(
        [sys.executable, str(PROBE), check], env={**base, **env}, capture_output=True, text=True, timeout=30
    )


async def test_readiness_probe_sees_the_agent_joined(
    insecure_server: EmbeddedServer, insecure_settings: Settings
) -> None:
    assert insecure_server.info is not None
    name = f"k8s-probe-{uuid.uuid4().hex[:8]}"
    agent = Agent(name, description="a probe's subject")

    @agent.handler
    async def on_ping(ping: Ping, ctx: Context) -> None:  # any handler: the agent needs one
        return None

    env = {
        "PROBE_AGENT": name,
        "PROBE_POD_IP": "127.0.0.1",  # where the test's connections come from
        "PROBE_NATS_MONITOR": f"http://127.0.0.1:1,{insecure_server.info.monitor_url}",  # one node down
    }
    before = await asyncio.to_thread(_probe, "ready", env)
    assert before.returncode == 1 and "answering discovery" in before.stdout
    async with running_agent(agent, insecure_settings) as runtime:
        await runtime.transport.flush()  # the server has its subscriptions
        ready = await asyncio.to_thread(_probe, "ready", env)
        assert ready.returncode == 0, ready.stdout
        other_pod = await asyncio.to_thread(_probe, "ready", {**env, "PROBE_POD_IP": "10.255.255.1"})
        assert other_pod.returncode == 1
    unset = await asyncio.to_thread(_probe, "ready", {})
    assert unset.returncode == 1 and "PROBE_AGENT" in unset.stdout


async def test_liveness_probe_sees_the_connection_to_nats(insecure_settings: Settings) -> None:
    assert insecure_settings.nats_url is not None
    port = insecure_settings.nats_url.rsplit(":", 1)[1]
    transport = await NatsTransport.connect(insecure_settings, "k8s-live")
    try:
        live = await asyncio.to_thread(_probe, "live", {"PROBE_NATS_PORT": port})
        assert live.returncode == 0, live.stdout
    finally:
        await transport.close()
    nothing = await asyncio.to_thread(_probe, "live", {"PROBE_NATS_PORT": "1"})  # no one serves port 1
    assert nothing.returncode == 1 and "no established connection" in nothing.stdout
