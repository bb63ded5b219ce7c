"""Processes of a run: services, drivers, and the CPU time they spend, read from /proc."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.workloads import System, Workload
from mesh import launch

ROOT = Path(__file__).resolve().parent.parent
_TICK = os.sysconf("SC_CLK_TCK")
_PY = (sys.executable, "-m")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / _TICK


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


class Group:
    """The services and the driver of one workload on one system."""

    def __init__(self, workload: Workload, system: System, url: str, work: Path) -> None:
        self.workload = workload
        self.system = system
        self.url = url
        self.work = work
        self.services: list[subprocess.Popen[bytes]] = []
        self.driver: subprocess.Popen[str] | None = None
        self.logs = work / "logs"
        self.mesh_env = {
            "MESH_NATS_URL": url,
            "MESH_DATA_DIR": str(work / "data"),
            "MESH_TRACE_EXPORTER": "file",
            "MESH_TRACE_FILE": str(work / f"spans-{system.key}.jsonl"),
            "BENCH_SUFFIX": system.suffix,
            **system.env,
            **workload.mesh_env,
        }

    def start(self) -> None:
        for name in self.workload.services(self.system):
            log = self.logs / f"{self.workload.key}-{self.system.key}-{name}.log"
            if self.system.kind == "mesh":
                env = {k: v for k, v in self.mesh_env.items() if k not in ("MESH_NATS_URL", "MESH_DATA_DIR")}
                env["PYTHONPATH"] = _env({})["PYTHONPATH"]
                self.services.append(
                    launch.spawn_agent(
                        f"benchmarks.mesh_agents:{name}",
                        url=self.url,
                        data_dir=self.work / "data",
                        log=log,
                        env=env,
                    )
                )
            else:
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("ab") as fh:
                    self.services.append(
                        subprocess.Popen(
                            [*_PY, "benchmarks.raw_services", name, *self._where],
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
                raise RuntimeError(f"{self.system.key} driver of {self.workload.key}: no answer to {cmd}")
        line = self.driver.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.system.key} driver of {self.workload.key} exited: {self._log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _log_tail(self) -> str:
        path = self.logs / f"{self.workload.key}-{self.system.key}-driver.log"
        try:
            return path.read_text()[-2000:]
        except OSError:
            return f"no log at {path}"

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
