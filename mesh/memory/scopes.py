"""Whose memories a caller may reach: the tenant and namespaces of each identity.

The memory service never takes the tenant from a request's body. It looks up the caller (the
sender of the request, `mesh.wire.senders.sender_of`) in the scopes the operator declares for
it, ``MESH_MEMORY_SCOPES``::

    research=acme/customer-*, writer=acme, *=default

Each entry is ``<identity>=<tenant>`` with, after a ``/``, the namespaces it may use separated
by ``|`` (a trailing ``*`` matches any ending; none listed: any namespace). ``*`` names every
identity not listed. An identity that matches no entry is in tenant ``default`` with any
namespace, which is how a mesh without declared scopes behaves.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.wire.errors import ConfigError, MemoryRefused

_DEFAULT_TENANT = "default"


@dataclass(frozen=True, slots=True)
class Scope:
    """One identity's reach: its tenant, and the namespace patterns it may use (() = any)."""

    tenant: str
    namespaces: tuple[str, ...] = ()

    def allows(self, namespace: str) -> bool:
        if not self.namespaces:
            return True
        return any(
            namespace.startswith(p[:-1]) if p.endswith("*") else namespace == p for p in self.namespaces
        )

    def check(self, identity: str, namespace: str) -> str:
        """`namespace` if this scope allows it, else the typed refusal."""
        if namespace != "_working" and not self.allows(namespace):
            raise MemoryRefused(
                "not_allowed",
                f"{identity!r} may not use namespace {namespace!r}: its scopes are "
                f"{', '.join(self.namespaces)} (MESH_MEMORY_SCOPES on the memory service)",
            )
        return namespace


@dataclass(frozen=True, slots=True)
class Scopes:
    """The declared scopes of every identity, parsed once from MESH_MEMORY_SCOPES."""

    by_identity: dict[str, Scope]

    @classmethod
    def parse(cls, text: str) -> Scopes:
        out: dict[str, Scope] = {}
        for entry in (e.strip() for e in text.split(",")):
            if not entry:
                continue
            identity, sep, rest = entry.partition("=")
            tenant, _, spaces = rest.partition("/")
            if not sep or not identity.strip() or not tenant.strip():
                raise ConfigError(
                    f"MESH_MEMORY_SCOPES entry {entry!r} is not <identity>=<tenant>[/<namespace>|...]"
                )
            names = tuple(n.strip() for n in spaces.split("|") if n.strip())
            out[identity.strip()] = Scope(tenant.strip(), names)
        return cls(out)

    def of(self, identity: str) -> Scope:
        """The scope of `identity`: its own entry, else ``*``'s, else tenant ``default``."""
        return self.by_identity.get(identity) or self.by_identity.get("*") or Scope(_DEFAULT_TENANT)
