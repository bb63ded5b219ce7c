"""`mesh creds`: issuing identities into a keyring for deployment, exporting them, listing and
revoking them, and adopting the key of a credentials file made elsewhere (a JWT ``.creds`` of
decentralized auth), which then signs and is verified like any other identity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import SAMPLES

from mesh.cli.main import cli
from mesh.transport.auth import connect_options, creds_text, new_seed, public_key, read_seed
from mesh.transport.keys import directory_of, signer_of
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

# a JWT .creds file as nsc writes it: the user JWT, then the user's seed (the JWT is not
# checked here; only a server with decentralized auth would read it)
JWT_CREDS = """-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVLi4uIn0.c2lnbmF0dXJl
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------
"""


def _mesh(tmp_path: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env["MESH_DATA_DIR"] = str(tmp_path / "data")
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_issue_export_list_and_revoke(tmp_path: Path) -> None:
    keyring = tmp_path / "keys"
    out = _mesh(tmp_path, "creds", "agent", f"{SAMPLES / 'echo.py'}:agent", "--keyring", str(keyring))
    creds = keyring / "agents" / "echo" / "echo.creds"
    assert f"agent:echo: {creds}" in out and oct(creds.stat().st_mode & 0o777) == "0o600"
    exported = tmp_path / "echo.creds"
    _mesh(tmp_path, "creds", "role", "publisher", "--keyring", str(keyring), "--out", str(exported))
    assert read_seed(exported) == read_seed(keyring / "roles" / "publisher" / "publisher.creds")
    listed = _mesh(tmp_path, "creds", "ls", "--keyring", str(keyring))
    assert "agent:echo" in listed and "role:publisher" in listed
    _mesh(tmp_path, "creds", "revoke", "agent:echo", "--keyring", str(keyring))
    assert "agent:echo" not in _mesh(tmp_path, "creds", "ls", "--keyring", str(keyring))
    assert not creds.exists()


def test_a_jwt_creds_file_is_adopted_and_then_signs_and_is_verified(tmp_path: Path) -> None:
    """The key of a JWT .creds file becomes the agent's identity in users.json; a process
    given that file (and the identities) connects with the JWT, receives replies on its own
    inbox prefix, signs with the seed in the file, and verifies senders."""
    seed = new_seed()
    jwt = tmp_path / "echo-nsc.creds"
    jwt.write_text(JWT_CREDS.format(seed=seed.decode()))
    keyring = tmp_path / "keys"
    spec = f"{SAMPLES / 'echo.py'}:agent"
    _mesh(tmp_path, "creds", "agent", spec, "--from", str(jwt), "--keyring", str(keyring))
    rows = json.loads((keyring / "public" / "users.json").read_text())
    assert {r["identity"]: r["nkey"] for r in rows}["agent:echo"] == public_key(seed)

    options = connect_options(jwt)
    assert options == {"user_credentials": str(jwt), "inbox_prefix": f"_INBOX.{public_key(seed)}"}
    settings = Settings.load(environ={}, nats_creds=jwt)
    signer = signer_of(settings)
    assert signer is not None and signer.public_key == public_key(seed)
    with pytest.raises(ConfigError, match="MESH_IDENTITIES"):
        directory_of(settings)  # outside a keyring, it must be told where the identities are
    verifying = Settings.load(environ={}, nats_creds=jwt, identities=keyring / "public")
    directory = directory_of(verifying)
    assert directory is not None and directory.identity(public_key(seed)) == "agent:echo"


def test_from_names_one_agent_and_a_file_with_a_seed(tmp_path: Path) -> None:
    spec = f"{SAMPLES / 'echo.py'}:agent"
    seedless = tmp_path / "not.creds"
    seedless.write_text("no seed here")
    env = {"MESH_DATA_DIR": str(tmp_path / "data")}
    two = CliRunner().invoke(cli, ["creds", "agent", spec, spec, "--from", str(seedless)], env=env)
    assert two.exit_code == 2 and "name one SPEC" in two.output
    bad = CliRunner().invoke(cli, ["creds", "agent", spec, "--from", str(seedless)], env=env)
    assert isinstance(bad.exception, ConfigError) and "holds no NATS user seed" in str(bad.exception)
    good = tmp_path / "ok.creds"
    good.write_text(creds_text(new_seed()))
    _mesh(tmp_path, "creds", "role", "observer", "--from", str(good))
    issued = tmp_path / "data" / "auth" / "roles" / "observer" / "observer.creds"
    assert read_seed(issued) == read_seed(good)
