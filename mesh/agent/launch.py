"""Starting agents as their own OS processes (`mesh run`), as the demo and tests do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from mesh.wire.settings import Settings


def spawn_agent(
    spec: str,
    *,
    url: str,
    data_dir: Path,
    log: Path,
    env: Mapping[str, str] | None = None,
    settings: Settings | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``mesh run spec`` against `url`; its output is appended to `log`.

    The child gets this process's environment without its MESH_* variables, then `settings`
    as MESH_* variables (so it stores, retries and traces as this process was configured,
    e.g. with the same MESH_REPLICAS), then MESH_NATS_URL, MESH_DATA_DIR and `env`.
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    full_env.update(settings.environ() if settings is not None else {})
    full_env.update({"MESH_NATS_URL": url, "MESH_DATA_DIR": str(data_dir)})
    full_env.update(env or {})
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "mesh", "run", spec],
            env=full_env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15.0, *, terminate: bool = True) -> int:
    """SIGTERM (unless already sent: ``terminate=False``), wait for a graceful exit, SIGKILL
    if it does not come; the exit code. A second SIGTERM would cut a drain short."""
    if terminate and proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()
