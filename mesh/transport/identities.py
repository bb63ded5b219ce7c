"""Identities on the server (or the local cluster) that `mesh up` started: issued from the
data dir's keyring, and made known to every running server by a reload (SIGHUP).

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

from mesh.transport import cluster as cl
from mesh.transport import server as srv
from mesh.transport.auth import ROLES, AgentGrant, Keyring, Role
from mesh.wire.errors import ConfigError, ServerError
from mesh.wire.secrets import redact_url
from mesh.wire.settings import Settings

RELOAD_TIMEOUT = 10.0


def keyring_dir(settings: Settings) -> Path:
    return settings.data_dir / "auth"


def local_mesh(settings: Settings) -> tuple[str, list[srv.ServerInfo]] | None:
    """The client URL and the live servers of what `mesh up` runs under this data dir: its
    server, or the members of its cluster (the URL then names them all, comma-separated)."""
    info = srv.running(settings)
    if info is not None:
        return info.url, [info]
    return cl.running(settings)


def local_keyring(settings: Settings) -> tuple[Keyring, list[srv.ServerInfo]] | None:
    """The keyring of the server or cluster `mesh up` runs under this data dir, with its live
    servers, when they require authentication and this process connects to them (no other
    MESH_NATS_URL: unset, or naming only their members)."""
    found = local_mesh(settings)
    if found is None:
        return None
    url, servers = found
    if not servers[0].auth:
        return None
    if settings.nats_url and not _urls(settings.nats_url) <= _urls(url):
        return None
    return Keyring(Path(servers[0].auth)), servers


def _urls(url: str) -> set[str]:
    return {u.strip() for u in url.split(",") if u.strip()}


def with_role(settings: Settings, role: Role) -> Settings:
    """`settings` with the credentials of `role` from the local keyring, unless the process
    has its own (MESH_NATS_CREDS) or the server needs none."""
    if settings.nats_creds is not None:
        return settings
    local = local_keyring(settings)
    if local is None:
        return settings
    keyring, servers = local
    with keyring.locked():
        if keyring.issue_role(role, settings):
            reload(*servers)
    return settings.model_copy(update={"nats_creds": keyring.creds_path(f"role:{role}")})


def with_agent(settings: Settings, grant: AgentGrant) -> tuple[Settings, bool]:
    """`settings` with agent `grant.name`'s credentials from the local keyring (issued or
    brought up to date with its declaration), and whether it was issued here."""
    if settings.nats_creds is not None:
        return settings, False
    local = local_keyring(settings)
    if local is None:
        return settings, False
    keyring, servers = local
    with keyring.locked():
        if keyring.issue_agent(grant, settings):
            reload(*servers)
    return settings.model_copy(update={"nats_creds": keyring.creds_path(f"agent:{grant.name}")}), True


def _load_time(monitor_url: str) -> str:
    with urllib.request.urlopen(f"{monitor_url}/varz", timeout=2) as resp:
        return str(json.loads(resp.read()).get("config_load_time", ""))


def reload(*servers: srv.ServerInfo) -> None:
    """Have every server read its configuration again (its users), all at once, and wait
    until each has. A server that is gone meanwhile is skipped: it reads the users when it
    starts again (a cluster member that was stopped)."""
    signalled: list[tuple[srv.ServerInfo, str]] = []
    for info in servers:
        try:
            before = _load_time(info.monitor_url) if info.monitor_url else ""
            os.kill(info.pid, signal.SIGHUP)
        except OSError:  # no answer, or no such process
            if srv.is_our_server(info.pid, info.directory):
                raise
            continue  # stopped since it was found
        if info.monitor_url:
            signalled.append((info, before))
    deadline = time.monotonic() + RELOAD_TIMEOUT
    for info, before in signalled:
        while _reloaded(info, before) is False:
            if time.monotonic() > deadline:
                raise ServerError(
                    f"nats-server at {redact_url(info.url)} did not reload its users in "
                    f"{RELOAD_TIMEOUT:.0f}s; see {Path(info.directory) / 'nats-server.log'}"
                )
            time.sleep(0.02)


def _reloaded(info: srv.ServerInfo, before: str) -> bool | None:
    """True once `info` has loaded its configuration since `before`; None if it is gone."""
    try:
        return _load_time(info.monitor_url) != before
    except OSError:
        if not srv.is_our_server(info.pid, info.directory):
            return None
        return False  # alive, but its monitoring port did not answer this time


def refuse_anonymous(settings: Settings, servers: list[str]) -> None:
    """A process connects with an identity unless someone said otherwise: its credentials
    (MESH_NATS_CREDS, or a user or token in the URL), MESH_INSECURE, or the server `mesh up
    --insecure` runs under this data dir. `ConfigError` saying what to do otherwise."""
    if settings.nats_creds is not None or settings.nats_tls_cert is not None or settings.insecure:
        return  # credentials, or a client certificate (the server may map it to a user)
    if any("@" in s.partition("://")[2].partition("/")[0] for s in servers):
        return  # a user and password, or a token: the server decides
    found = local_mesh(settings)
    if found is not None and not found[1][0].auth and set(servers) <= _urls(found[0]):
        return  # `mesh up --insecure` said it
    shown = redact_url(", ".join(servers))
    raise ConfigError(
        f"this process has no identity to connect to NATS at {shown} with. Give it its credentials "
        f"(MESH_NATS_CREDS, made by `mesh creds`), or run it with the MESH_DATA_DIR of `mesh up`; "
        f"for a server that requires no authentication, say so: MESH_INSECURE=true "
        f"(`mesh run --insecure`)"
    )


def _keyring_with_roles(settings: Settings) -> Path:
    """The data dir's keyring, with the roles issued and ``auth.conf`` written; its directory."""
    keyring = Keyring(keyring_dir(settings))
    with keyring.locked():
        for role in ROLES:
            keyring.issue_role(role, settings)
        keyring.write()
    return keyring.directory


def embedded_server(settings: Settings, *, insecure: bool = False, **options: object) -> srv.EmbeddedServer:
    """The server `mesh up` (and `mesh demo`) starts under the data dir: requiring an
    identity of every client, the roles issued in the data dir's keyring, unless `insecure`."""
    auth = None if insecure else _keyring_with_roles(settings)
    return srv.EmbeddedServer(srv.server_dir(settings), auth=auth, **options)  # type: ignore[arg-type]


def embedded_cluster(
    settings: Settings, n: int, *, insecure: bool = False, **options: object
) -> cl.EmbeddedCluster:
    """The cluster of `n` servers `mesh up --cluster` starts under the data dir: every member
    requiring an identity of every client from the data dir's one keyring, and its routes a
    password of their own, unless `insecure`."""
    auth = None if insecure else _keyring_with_roles(settings)
    return cl.EmbeddedCluster(cl.cluster_dir(settings), n, auth=auth, **options)  # type: ignore[arg-type]


def as_role(settings: Settings, server: srv.EmbeddedServer | cl.EmbeddedCluster, role: Role) -> Settings:
    """`settings` acting as `role` on `server` (or a cluster), just started (not yet recorded)."""
    if server.auth is None:
        return settings
    return settings.model_copy(update={"nats_creds": Keyring(server.auth).creds_path(f"role:{role}")})
