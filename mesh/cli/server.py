"""`mesh up` and `mesh down`: the embedded nats-server, or a local cluster of them
(`mesh up --cluster N`), started under the data dir and found again by later commands."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import click

from mesh.transport import cluster as cl
from mesh.transport import server as srv
from mesh.transport.identities import as_role, embedded_cluster, embedded_server
from mesh.transport.nats import NatsTransport
from mesh.transport.streams import bucket_specs
from mesh.wire.errors import ConfigError
from mesh.wire.secrets import redact_url
from mesh.wire.settings import Settings

INSECURE_WARNING = (
    "WARNING: --insecure: the server requires no authentication. Any process that reaches its port "
    "can read every message, act as any agent, approve tool calls and delete streams. Use it only "
    "for experiments on a machine you alone use."
)
INSECURE_CLUSTER_WARNING = (
    "WARNING: --insecure: the cluster's servers require no authentication, of clients nor of routes. "
    "Any process that reaches one of their ports can read every message, act as any agent, approve "
    "tool calls and delete streams. Use it only for experiments on a machine you alone use."
)


async def create_streams(settings: Settings, url: str, *, buckets: bool) -> None:
    transport = await NatsTransport.connect(settings, "mesh-up", url=url)
    try:
        await transport.ensure_streams()
        for bucket in bucket_specs(settings) if buckets else []:
            await transport.state(bucket, settings)
    finally:
        await transport.close()


def _cluster_replicas(settings: Settings, nodes: int) -> int:
    """MESH_REPLICAS if given, else as many as survive a lost server (3), at most `nodes`."""
    replicas = settings.replicas if "replicas" in settings.model_fields_set else min(nodes, 3)
    if replicas > nodes:
        raise ConfigError(
            f"MESH_REPLICAS={replicas} needs at least {replicas} servers: start `mesh up --cluster "
            f"{replicas}` or more, or lower MESH_REPLICAS"
        )
    return replicas


def register(cli: click.Group, settings_fn: Callable[[], Settings]) -> None:
    @cli.command()
    @click.option("--detach", is_flag=True, help="Start in the background and return.")
    @click.option(
        "--cluster",
        "nodes",
        type=click.IntRange(2, 9),
        metavar="N",
        help="Start a cluster of N nats-servers on loopback instead of one; prints its MESH_NATS_URL.",
    )
    @click.option(
        "--insecure",
        is_flag=True,
        help="Let any client connect and do anything (no identities, no permissions). For experiments only.",
    )
    def up(detach: bool, nodes: int | None, insecure: bool) -> None:
        """Start the embedded nats-server (loopback, JetStream) under the data dir.

        Clients must authenticate: each agent gets its own identity and permissions from its
        declaration, commands act with a role (docs/security.md). `--insecure` turns that off.
        """
        settings = settings_fn()
        if insecure:
            click.echo(INSECURE_CLUSTER_WARNING if nodes else INSECURE_WARNING, err=True)
        if settings.nats_url:
            raise ConfigError(
                f"MESH_NATS_URL is set ({redact_url(settings.nats_url)}), so mesh commands use that server, "
                f"not one `mesh up` would start: unset MESH_NATS_URL to use the embedded server"
            )
        info, members = srv.running(settings), cl.running(settings)
        if info is not None:
            click.echo(f"a mesh server is already running: {info.url} (pid {info.pid})")
            return
        if members is not None:
            click.echo(f"a mesh cluster is already running: {members[0]}")
            return
        if nodes:
            settings = settings.model_copy(update={"replicas": _cluster_replicas(settings, nodes)})
        stop = False

        def on_signal(signum: int, frame: object) -> None:
            nonlocal stop
            stop = True

        if not detach:  # before the servers start, so a signal at any point stops them cleanly
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        sync_always = settings.fsync == "always"
        servers: list[srv.EmbeddedServer] = []
        try:
            if nodes:
                cluster = embedded_cluster(
                    settings, nodes, insecure=insecure, tie_to_parent=not detach, sync_always=sync_always
                )
                cluster.start()
                servers, url, clear = cluster.nodes, cluster.url, cl.clear_state
                cl.write_state(settings, cluster)
                click.echo(
                    f"mesh cluster up: {nodes} nats-servers, JetStream meta leader {cluster.meta_leader()}, "
                    f"stores under {cl.cluster_dir(settings)}. In the shell of each agent and command:\n"
                    f"export MESH_NATS_URL={url}\nexport MESH_REPLICAS={settings.replicas}"
                )
                _say_auth(cluster.auth)
                settings = as_role(settings, cluster, "operator")
            else:
                server = embedded_server(
                    settings, insecure=insecure, tie_to_parent=not detach, sync_always=sync_always
                )
                info = server.start()
                servers, url, clear = [server], info.url, srv.clear_state
                srv.write_state(settings, info)
                click.echo(f"mesh server up: {info.url} (pid {info.pid}, store {srv.server_dir(settings)})")
                _say_auth(server.auth)
                settings = as_role(settings, server, "operator")
            # publishers may come before any agent, and agents may not create streams or
            # buckets: all of them now, on a cluster with its replicas
            asyncio.run(create_streams(settings, url, buckets=True))
        except BaseException:
            _stop(servers)
            (cl.clear_state if nodes else srv.clear_state)(settings)
            raise
        if detach:
            click.echo("stop it with `mesh down`")
            return
        click.echo("Ctrl-C to stop")
        try:
            exited: set[str] = set()
            while not stop and len(exited) < len(servers):
                for s in servers:
                    if s.name not in exited and s.wait(timeout=0.5 / len(servers)) is not None:
                        exited.add(s.name)
                        click.echo(f"nats-server {s.name} exited on its own; see {s.log_path}", err=True)
        finally:
            _stop(servers)
            clear(settings)
            click.echo("mesh server stopped")

    @cli.command()
    def down() -> None:
        """Stop the server (or cluster) started by `mesh up`."""
        settings = settings_fn()
        info = srv.running(settings)
        stopped = cl.stop_recorded(settings)
        if info is not None:
            os.kill(info.pid, signal.SIGTERM)
            for _ in range(200):
                if srv.running(settings) is None:
                    break
                time.sleep(0.05)
            srv.clear_state(settings)
            stopped.append(info.pid)
        if not stopped:
            click.echo("no mesh server is running")
            return
        click.echo(f"mesh server stopped (pid {', '.join(map(str, stopped))})")


def _say_auth(keyring: Path | None) -> None:
    if keyring is not None:
        click.echo(
            f"authentication on: identities and credentials under {keyring} "
            f"(`mesh creds` exports them for deployment)"
        )


def _stop(servers: list[srv.EmbeddedServer]) -> None:
    for s in servers:
        s.terminate()  # all at once: each flushes its store meanwhile
    for s in servers:
        s.stop()
