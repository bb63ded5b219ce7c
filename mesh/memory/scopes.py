"""Whose memories a caller may reach: the tenant and namespaces of each identity.

The memory service never takes the tenant from a request's body. It looks up the caller (the
sender of the request, `mesh.wire.senders.sender_of`) in the scopes the operator declares for
it, ``MESH_MEMORY_SCOPES``::

    research=acme/customer-*, writer=acme, *=default

Each entry is ``<identity>=<tenant>`` with, after a ``/``, the namespaces it may use separated
by ``|`` (a trailing ``*`` matches any ending; none listed: any namespace). ``*`` names every
identity not listed. An identity that matches no entry is in tenant ``default`` with any
namespace, which is how a mesh without declared scopes behaves.

An agent may also declare the namespaces it uses, ``Agent("research",
memory_scopes=["customer-*"])``. On a mesh with identities the declaration travels with the
agent's identity (the keyring's ``users.json``) and the memory service holds the agent to
both: a namespace must be allowed by the operator's entry and by the declaration.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.wire.errors import ConfigError, MemoryRefused

_DEFAULT_TENANT = "default"
MAX_PATTERN = 128  # characters of a namespace pattern


def namespace_patterns(patterns: object, where: str) -> tuple[str, ...]:
    """`patterns` checked as namespace patterns (a name, or a prefix and a trailing ``*``);
    `ConfigError` naming `where` and the bad one otherwise."""
    if isinstance(patterns, str) or not isinstance(patterns, list | tuple | set | frozenset):
        raise ConfigError(f"{where}: give a list of namespaces, e.g. ['kb', 'customer-*']")
    out = []
    for p in patterns:
        ok = isinstance(p, str) and 0 < len(p) <= MAX_PATTERN and p.isprintable() and " " not in p
        if not ok or "*" in p[:-1]:
            raise ConfigError(
                f"{where}: {p!r} is not a namespace pattern: 1-{MAX_PATTERN} printable characters "
                f"without spaces, '*' only at the end"
            )
        out.append(p)
    return tuple(sorted(set(out)))


def _allowed(patterns: tuple[str, ...], namespace: str) -> bool:
    return any(namespace.startswith(p[:-1]) if p.endswith("*") else namespace == p for p in patterns)


@dataclass(frozen=True, slots=True)
class Scope:
    """One identity's reach: its tenant, and the namespace patterns it may use (() = any)."""

    tenant: str
    namespaces: tuple[str, ...] = ()
    declared: tuple[str, ...] | None = None  # the agent's own memory_scopes, if it declared them

    def allows(self, namespace: str) -> bool:
        by_operator = not self.namespaces or _allowed(self.namespaces, namespace)
        return by_operator and (self.declared is None or _allowed(self.declared, namespace))

    def check(self, identity: str, namespace: str) -> str:
        """`namespace` if this scope allows it, else the typed refusal."""
        if namespace == "_working" or self.allows(namespace):
            return namespace
        if self.namespaces and not _allowed(self.namespaces, namespace):
            why = f"its scopes are {', '.join(self.namespaces)} (MESH_MEMORY_SCOPES on the memory service)"
        else:
            shown = ", ".join(self.declared or ()) or "none"
            why = f"it declares memory_scopes {shown} (Agent(..., memory_scopes=...))"
        raise MemoryRefused("not_allowed", f"{identity!r} may not use namespace {namespace!r}: {why}")


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
