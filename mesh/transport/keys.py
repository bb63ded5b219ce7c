"""Who holds which public key: the identities a verifier knows.

The directory is the keyring's ``users.json``, the file the server's ``auth.conf`` is written
from: the keys a verifier trusts are exactly the keys the server admits, a revoked identity
leaves both at once, and the file holds public keys and permissions only (no seed), so it
can be handed to every process (MESH_IDENTITIES). It is read again when a signer is not
found in it and the file changed since (an agent issued after this process started).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from mesh.transport.auth import read_seed
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings
from mesh.wire.signature import Signer

USERS = "users.json"


class KeyDirectory:
    """Public key -> identity (``agent:<name>`` or ``role:<role>``), from ``users.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._by_key: dict[str, str] = {}
        self._agents: set[str] = set()
        self._memory: dict[str, tuple[str, ...]] = {}  # agent name -> its declared memory scopes
        self._mtime = -1
        self._load()

    @classmethod
    def of(cls, table: dict[str, str]) -> KeyDirectory:
        """A directory from a table in memory (tests)."""
        d = cls.__new__(cls)
        d.path, d._mtime = Path(), 0
        d._by_key = dict(table)
        d._agents = {i.split(":", 1)[1] for i in table.values() if i.startswith("agent:")}
        d._memory = {}
        return d

    def _load(self) -> bool:
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError as exc:
            raise ConfigError(f"cannot read the identities {self.path}: {exc.strerror}") from None
        if mtime == self._mtime:
            return False
        rows = json.loads(self.path.read_text())
        self._by_key = {str(r["nkey"]): str(r["identity"]) for r in rows}
        self._agents = {i.split(":", 1)[1] for i in self._by_key.values() if i.startswith("agent:")}
        self._memory = {
            str(r["identity"]).split(":", 1)[1]: tuple(str(p) for p in r["memory"])
            for r in rows
            if str(r["identity"]).startswith("agent:") and isinstance(r.get("memory"), list)
        }
        self._mtime = mtime
        return True

    def identity(self, public_key: str) -> str | None:
        """Whose key this is, or None (read the file again first if it changed)."""
        found = self._by_key.get(public_key)
        if found is None and self._mtime > 0:
            try:
                if self._load():
                    found = self._by_key.get(public_key)
            except (ConfigError, ValueError):
                return None
        return found

    def is_agent(self, name: str) -> bool:
        return name in self._agents

    def memory_scopes(self, agent: str) -> tuple[str, ...] | None:
        """The memory namespaces agent `agent` declares (None: it declares none, or is not an
        agent), as its identity was last issued (read the file again first if it changed)."""
        if self._mtime > 0:
            with contextlib.suppress(ConfigError, ValueError):  # keep what was read last
                self._load()
        return self._memory.get(agent)


def directory_path(settings: Settings) -> Path | None:
    """Where this process finds the identities: MESH_IDENTITIES, else the ``users.json`` of
    the keyring its credentials file was issued in (``<keyring>/agents/<name>/<name>.creds``),
    else None."""
    if settings.identities is not None:
        return settings.identities / USERS if settings.identities.is_dir() else settings.identities
    creds = settings.nats_creds
    if creds is None:
        return None
    candidate = creds.resolve().parent.parent.parent / USERS
    return candidate if candidate.is_file() else None


def signer_of(settings: Settings) -> Signer | None:
    """This process's signer: the NKEY seed of its credentials (a seed file, or the seed in a
    JWT ``.creds`` file), None without credentials (an insecure mesh)."""
    if settings.nats_creds is None:
        return None
    try:
        seed = read_seed(settings.nats_creds)
    except OSError as exc:
        raise ConfigError(f"cannot read the NATS credentials {settings.nats_creds}: {exc.strerror}") from None
    return Signer(seed)


def directory_of(settings: Settings) -> KeyDirectory | None:
    """The identities to verify senders against, when this process has an identity of its
    own; a process with one and no directory to find fails here, at start."""
    if signer_of(settings) is None:
        return None
    path = directory_path(settings)
    if path is None:
        raise ConfigError(
            f"cannot verify senders: no identities next to {settings.nats_creds}. Set MESH_IDENTITIES "
            f"to the keyring's users.json (`mesh creds` writes it; it holds public keys only)"
        )
    return KeyDirectory(path)


def known_directory(settings: Settings) -> KeyDirectory | None:
    """The identities, when this process has an identity and they can be found; None
    otherwise (a reader that verifies what it can, such as `mesh agents`)."""
    if signer_of(settings) is None:
        return None
    path = directory_path(settings)
    return KeyDirectory(path) if path is not None else None
