"""`mesh creds`: identities and their credentials files, for deployment.

The keyring is ``<MESH_DATA_DIR>/auth`` by default, the one `mesh up` uses; ``--keyring DIR``
keeps another (e.g. a volume shared with the nats-server container). After a change, a server
started by `mesh up` on this data dir reloads at once; any other server must be told to
(`nats-server --signal reload`, or SIGHUP), its configuration including ``auth.conf``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import click

from mesh.agent.identity import grant_of
from mesh.agent.loader import load_agent
from mesh.transport import server as srv
from mesh.transport.auth import ROLES, Keyring, Role
from mesh.transport.identities import keyring_dir, reload
from mesh.wire.settings import Settings

SERVER_CONF = "nats.conf"


def _keyring(settings: Settings, directory: str | None) -> Keyring:
    return Keyring(Path(directory) if directory else keyring_dir(settings))


def _changed(settings: Settings, keyring: Keyring) -> None:
    """Tell the server that uses this keyring, if `mesh up` runs it here."""
    info = srv.running(settings)
    if info is not None and info.auth and Path(info.auth).resolve() == keyring.directory.resolve():
        reload(info)
        click.echo(f"reloaded the server at {info.url}")
    else:
        click.echo(f"users written to {keyring.conf_path}: reload the nats-server that includes it")


def _export(keyring: Keyring, identity: str, out: str | None) -> None:
    path = keyring.creds_path(identity)
    if out:
        target = Path(out)
        if target.is_dir():
            target = target / path.name
        shutil.copyfile(path, target)
        target.chmod(0o600)
        path = target
    click.echo(f"{identity}: {path}")


def register(cli: click.Group, settings_fn: Callable[[], Settings]) -> None:
    keyring_option = click.option(
        "--keyring", "keyring", metavar="DIR", help="Keyring directory (default: <MESH_DATA_DIR>/auth)."
    )
    from_option = click.option(
        "--from",
        "adopt",
        metavar="CREDS",
        type=click.Path(exists=True, dir_okay=False),
        help="Use the key of this credentials file (e.g. a JWT .creds made with nsc) instead of a new one.",
    )

    @cli.group()
    def creds() -> None:
        """Identities on the bus: one per agent (permissions from its declaration), and the
        roles operator, publisher and observer (docs/security.md)."""

    @creds.command("agent")
    @click.argument("specs", nargs=-1, required=True, metavar="SPEC...")
    @click.option("--out", metavar="PATH", help="Copy the credentials file here (a file or a directory).")
    @from_option
    @keyring_option
    def agent_cmd(specs: tuple[str, ...], out: str | None, adopt: str | None, keyring: str | None) -> None:
        """Issue (or bring up to date with its declaration) each agent's identity; print the
        path of its credentials file, for MESH_NATS_CREDS. SPEC as for `mesh run`.

        Give an agent with several event types its consumers with `mesh agents add SPEC`
        (as the operator): it may create only consumers with one filter itself."""
        if adopt and len(specs) > 1:
            raise click.UsageError("--from gives one agent a key: name one SPEC with it")
        settings = settings_fn()
        ring = _keyring(settings, keyring)
        changed = False
        with ring.locked():
            for spec in specs:
                agent = load_agent(spec)
                if adopt:
                    ring.adopt(f"agent:{agent.name}", Path(adopt))
                changed |= ring.issue_agent(grant_of(agent), settings)
                _export(ring, f"agent:{agent.name}", out)
        if changed:
            _changed(settings, ring)

    @creds.command("role")
    @click.argument("role", type=click.Choice(ROLES))
    @click.option("--out", metavar="PATH", help="Copy the credentials file here (a file or a directory).")
    @from_option
    @keyring_option
    def role_cmd(role: Role, out: str | None, adopt: str | None, keyring: str | None) -> None:
        """Issue a role's identity (if missing); print the path of its credentials file."""
        settings = settings_fn()
        ring = _keyring(settings, keyring)
        with ring.locked():
            if adopt:
                ring.adopt(f"role:{role}", Path(adopt))
            changed = ring.issue_role(role, settings)
            _export(ring, f"role:{role}", out)
        if changed:
            _changed(settings, ring)

    @creds.command("init")
    @click.option(
        "--agents", "agent_specs", default="", metavar="SPEC[,SPEC...]", help="Agents to issue too."
    )
    @keyring_option
    def init(agent_specs: str, keyring: str | None) -> None:
        """Issue the three roles (and --agents), and write ``nats.conf`` beside ``auth.conf``
        for a nats-server of your own: ``nats-server -c <keyring>/nats.conf -js ...``."""
        settings = settings_fn()
        ring = _keyring(settings, keyring)
        with ring.locked():
            for role in ROLES:
                ring.issue_role(role, settings)
            for spec in filter(None, (s.strip() for s in agent_specs.split(","))):
                ring.issue_agent(grant_of(load_agent(spec)), settings)
            ring.write()
            (ring.directory / SERVER_CONF).write_text('include "auth.conf"\n')
            for user in ring.users:
                click.echo(f"{user.identity:<24}{user.nkey}  {ring.creds_path(user.identity)}")
        click.echo(f"server configuration: {ring.directory / SERVER_CONF}")

    @creds.command("ls")
    @keyring_option
    def ls(keyring: str | None) -> None:
        """The identities the server admits, with their public keys."""
        ring = _keyring(settings_fn(), keyring)
        with ring.locked():
            for user in ring.users:
                click.echo(f"{user.identity:<24}{user.nkey}")

    @creds.command("revoke")
    @click.argument("identity", metavar="agent:NAME|role:ROLE")
    @keyring_option
    def revoke(identity: str, keyring: str | None) -> None:
        """Remove an identity: the server refuses its key from the next reload. To rotate a
        key, revoke it, issue it again and deploy the new credentials file."""
        settings = settings_fn()
        ring = _keyring(settings, keyring)
        with ring.locked():
            gone = ring.revoke(identity)
        if not gone:
            raise click.ClickException(f"no identity {identity!r} in {ring.directory}")
        click.echo(f"revoked {identity}")
        _changed(settings, ring)
