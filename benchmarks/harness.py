"""Processes of a run: services, drivers, and the CPU time they spend, read from /proc."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.workloads import System, Workload
from mesh.agent import launch
from mesh.transport import server as srv
from mesh.transport.identities import as_role, embedded_server
from mesh.transport.nats import NatsTransport
from mesh.transport.streams import bucket_specs
from mesh.wire.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_PY = (sys.executable, "-m")
QUIET = 0.05  # of one core, over all the processes counted: a phase's work is over
SERVICE_MODULES = {
    "raw": "benchmarks.raw_services",
    "jetstream": "benchmarks.raw_services",
    "faststream": "benchmarks.faststream_services",
}


def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()  # fields from the 3rd (state) on


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def process_tree(pids: list[int]) -> list[int]:
    """These processes and every live descendant (a wrapper's children count too)."""
    kids = _children()
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(kids.get(pid, []))
    return seen


def _on_cpu_ns(pid: int) -> int | None:
    """Nanoseconds on a CPU (user + system) of this process's live threads, from schedstat:
    clock ticks (10 ms) are too coarse for a phase of a few thousand events."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = read = 0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except OSError:
            continue  # the thread ended in between
        except (ValueError, IndexError):
            return None
        read += 1
    return total if read else None  # none: no schedstat in this kernel, use ticks


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) so far of these processes and their descendants: all their
    threads, and children that already exited and were waited for (cutime, cstime)."""
    total = 0.0
    for pid in process_tree(pids):
        fields = _stat(pid)
        if fields is None:
            continue
        ticks = sum(int(f) for f in fields[13:15])  # cutime cstime (fields 16, 17)
        precise = _on_cpu_ns(pid)
        if precise is None:
            ticks += int(fields[11]) + int(fields[12])  # utime stime (fields 14, 15)
        else:
            total += precise / 1e9
        total += ticks / _TICK
    return total


def settle(pids: list[int], *, window: float = 0.2, limit: float = 2.0) -> float:
    """Wait (at most `limit` s) until these processes together spend under `QUIET` of a core
    over one `window`: work a phase left behind (span export, acks, stream writes) is then
    done and counted. Returns their CPU seconds so far."""
    deadline = time.monotonic() + limit
    spent = cpu_seconds(pids)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = cpu_seconds(pids)
        if now - spent <= QUIET * window:
            return now
        spent = now
    return spent


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


@dataclass(frozen=True)
class Server:
    """A nats-server of the run. A secure one (`creds` set) requires authentication and is
    recorded under `data_dir` as `mesh up` records it, so a `mesh run` agent pointed at that
    data dir is issued its own identity from its declaration."""

    url: str
    pid: int
    data_dir: Path
    creds: Path | None = None  # the driver's credentials (the publisher role); None: no auth

    @property
    def secure(self) -> bool:
        return self.creds is not None


async def _create_streams(operator: Settings) -> None:
    """As `mesh up` does: under authentication agents may not create streams or buckets."""
    transport = await NatsTransport.connect(operator, "bench-up")
    try:
        await transport.ensure_streams()
        for bucket in bucket_specs(operator):
            await transport.state(bucket, operator)
    finally:
        await transport.close()


@contextmanager
def secure_server(data_dir: Path) -> Iterator[Server]:
    """A nats-server started as `mesh up` starts it (no --insecure) under `data_dir`: every
    client needs an identity from the data dir's keyring, the roles are issued, the server is
    recorded there, the streams and buckets are made as the operator. Stopped afterwards."""
    settings = Settings.load(environ={}, data_dir=data_dir, trace_exporter="none")
    server = embedded_server(settings)
    info = server.start()
    try:
        srv.write_state(settings, info)
        local = settings.model_copy(update={"nats_url": info.url})
        asyncio.run(_create_streams(as_role(local, server, "operator")))
        publisher = as_role(local, server, "publisher").nats_creds
        assert publisher is not None
        yield Server(info.url, info.pid, data_dir, publisher)
    finally:
        server.stop()
        srv.clear_state(settings)


class Group:
    """The services and the driver of one workload on one system."""

    def __init__(self, workload: Workload, system: System, server: Server, work: Path) -> None:
        self.workload = workload
        self.system = system
        self.server = server
        self.url = server.url
        self.work = work
        self.services: list[subprocess.Popen[bytes]] = []
        self.driver: subprocess.Popen[str] | None = None
        self.logs = work / "logs"
        if server.secure:
            # as on the machine that ran `mesh up`: agents get their identities from the data
            # dir's keyring, the driver connects as a program given its credentials file would
            assert server.creds is not None
            access = {"MESH_NATS_CREDS": str(server.creds)}
        else:
            # the insecure systems measure a mesh without identities (docs/performance.md), and say so
            access = {"MESH_INSECURE": "true"}
        self.mesh_env = {
            "MESH_NATS_URL": server.url,
            "MESH_DATA_DIR": str(server.data_dir),
            **access,
            "MESH_TRACE_EXPORTER": "file",
            "MESH_TRACE_FILE": str(work / f"spans-{system.key}.jsonl"),
            # spans leave the batch queue within 0.2 s (default 5 s), so the CPU of exporting a
            # phase's spans is spent, and counted, while the runner waits for the phase to settle
            "OTEL_BSP_SCHEDULE_DELAY": "200",
            "BENCH_SUFFIX": system.suffix,
            **system.env,
        }

    def start(self) -> None:
        for name in self.workload.services(self.system):
            log = self.logs / f"{self.workload.key}-{self.system.key}-{name}.log"
            if self.system.kind == "mesh":
                # an agent is given no credentials: `mesh run` issues its own identity
                skip = ("MESH_NATS_URL", "MESH_DATA_DIR", "MESH_NATS_CREDS")
                env = {k: v for k, v in self.mesh_env.items() if k not in skip}
                env["PYTHONPATH"] = _env({})["PYTHONPATH"]
                self.services.append(
                    launch.spawn_agent(
                        f"benchmarks.mesh_agents:{name}",
                        url=self.url,
                        data_dir=self.server.data_dir,
                        log=log,
                        env=env,
                    )
                )
            else:
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("ab") as fh:
                    self.services.append(
                        subprocess.Popen(
                            [*_PY, SERVICE_MODULES[self.system.kind], name, *self._where],
                            env=_env({}),
                            cwd=ROOT,
                            stdout=fh,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                        )
                    )
        err = (self.logs / f"{self.workload.key}-{self.system.key}-driver.log").open("ab")
        try:
            self.driver = subprocess.Popen(
                [*_PY, "benchmarks.driver", self.system.kind, self.workload.key, *self._where],
                env=_env(self.mesh_env if self.system.kind == "mesh" else {}),
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        finally:
            err.close()

    @property
    def _where(self) -> list[str]:
        return ["--url", self.url, f"--suffix={self.system.suffix}"]

    @property
    def pids(self) -> list[int]:
        procs: list[subprocess.Popen[Any]] = [*self.services, *([self.driver] if self.driver else [])]
        return [p.pid for p in procs]

    def command(self, cmd: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """Send one command to the driver and wait for its answer."""
        assert self.driver is not None and self.driver.stdin and self.driver.stdout
        for p in self.services:
            if p.poll() is not None:
                raise RuntimeError(f"a {self.system.key} service of {self.workload.key} exited ({p.args!r})")
        self.driver.stdin.write(json.dumps(cmd) + "\n")
        self.driver.stdin.flush()
        with selectors.DefaultSelector() as sel:
            sel.register(self.driver.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise RuntimeError(
                    f"{self.system.key} driver of {self.workload.key}: no answer to {cmd}\n{self.log_tails()}"
                )
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.system.key} driver of {self.workload.key} exited:\n{self.log_tails()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def log_tails(self, chars: int = 1500) -> str:
        """The end of every log of this group, for an error message (the logs go with the run)."""
        out = []
        for path in sorted(self.logs.glob(f"{self.workload.key}-{self.system.key}-*.log")):
            text = path.read_text(errors="replace")[-chars:].strip()
            if text:
                out.append(f"--- {path.name}\n{text}")
        return "\n".join(out) or "(empty logs)"

    def stop(self) -> None:
        if self.driver is not None:
            if self.driver.poll() is None:
                try:
                    assert self.driver.stdin is not None
                    self.driver.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.driver.stdin.flush()
                    self.driver.wait(10)
                except (OSError, subprocess.TimeoutExpired):
                    self.driver.kill()
                    self.driver.wait()
            for pipe in (self.driver.stdin, self.driver.stdout):
                if pipe is not None:
                    pipe.close()
            self.driver = None
        for p in self.services:
            if p.poll() is None:
                p.terminate()
        for p in self.services:
            launch.stop_process(p, timeout=10)
        self.services.clear()
