"""Identities on the server that `mesh up` started: issued from the data dir's keyring, and
made known to the running server by a reload (SIGHUP).

Whoever can read the data dir is that mesh's operator (its seeds live there), so on the
machine that ran `mesh up` a process without MESH_NATS_CREDS gets its identity from there:
an agent its own (issued on its first start from its declaration), a CLI command its role.
Elsewhere a process is given its credentials file (MESH_NATS_CREDS, made by `mesh creds`).
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request
from pathlib import Path

from mesh.transport import server as srv
from mesh.transport.auth import ROLES, AgentGrant, Keyring, Role
from mesh.wire.errors import ServerError
from mesh.wire.secrets import redact_url
from mesh.wire.settings import Settings

RELOAD_TIMEOUT = 10.0


def keyring_dir(settings: Settings) -> Path:
    return settings.data_dir / "auth"


def local_keyring(settings: Settings) -> tuple[Keyring, srv.ServerInfo] | None:
    """The keyring of the server `mesh up` runs under this data dir, when that server
    requires authentication and this process connects to it (no other MESH_NATS_URL)."""
    info = srv.running(settings)
    if info is None or not info.auth:
        return None
    if settings.nats_url and settings.nats_url != info.url:
        return None
    return Keyring(Path(info.auth)), info


def with_role(settings: Settings, role: Role) -> Settings:
    """`settings` with the credentials of `role` from the local keyring, unless the process
    has its own (MESH_NATS_CREDS) or the server needs none."""
    if settings.nats_creds is not None:
        return settings
    local = local_keyring(settings)
    if local is None:
        return settings
    keyring, info = local
    with keyring.locked():
        if keyring.issue_role(role, settings):
            reload(info)
    return settings.model_copy(update={"nats_creds": keyring.creds_path(f"role:{role}")})


def with_agent(settings: Settings, grant: AgentGrant) -> tuple[Settings, bool]:
    """`settings` with agent `grant.name`'s credentials from the local keyring (issued or
    brought up to date with its declaration), and whether it was issued here."""
    if settings.nats_creds is not None:
        return settings, False
    local = local_keyring(settings)
    if local is None:
        return settings, False
    keyring, info = local
    with keyring.locked():
        if keyring.issue_agent(grant, settings):
            reload(info)
    return settings.model_copy(update={"nats_creds": keyring.creds_path(f"agent:{grant.name}")}), True


def _load_time(monitor_url: str) -> str:
    with urllib.request.urlopen(f"{monitor_url}/varz", timeout=2) as resp:
        return str(json.loads(resp.read()).get("config_load_time", ""))


def reload(info: srv.ServerInfo) -> None:
    """Have the server read its configuration again (its users) and wait until it has."""
    before = _load_time(info.monitor_url) if info.monitor_url else ""
    os.kill(info.pid, signal.SIGHUP)
    if not info.monitor_url:
        return
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while _load_time(info.monitor_url) == before:
        if time.monotonic() > deadline:
            raise ServerError(
                f"nats-server at {redact_url(info.url)} did not reload its users in {RELOAD_TIMEOUT:.0f}s; "
                f"see {Path(info.directory) / 'nats-server.log'}"
            )
        time.sleep(0.02)


def embedded_server(settings: Settings, *, insecure: bool = False, **options: object) -> srv.EmbeddedServer:
    """The server `mesh up` (and `mesh demo`) starts under the data dir: requiring an
    identity of every client, the roles issued in the data dir's keyring, unless `insecure`."""
    auth = None
    if not insecure:
        keyring = Keyring(keyring_dir(settings))
        with keyring.locked():
            for role in ROLES:
                keyring.issue_role(role, settings)
            keyring.write()
        auth = keyring.directory
    return srv.EmbeddedServer(srv.server_dir(settings), auth=auth, **options)  # type: ignore[arg-type]


def as_role(settings: Settings, server: srv.EmbeddedServer, role: Role) -> Settings:
    """`settings` acting as `role` on `server`, which was just started (and not yet recorded)."""
    if server.auth is None:
        return settings
    return settings.model_copy(update={"nats_creds": Keyring(server.auth).creds_path(f"role:{role}")})
