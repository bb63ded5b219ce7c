"""Memory scopes: what the operator gives each identity (MESH_MEMORY_SCOPES) and what an agent
declares (``Agent(..., memory_scopes=[...])``), held together by the memory service. The
declaration travels with the agent's identity; the end-to-end test runs on a real server with
authentication on, every party on its own identity, and the real embedded Qdrant engine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import Agent
from mesh.agent.identity import grant_of
from mesh.memory.client import Memory
from mesh.memory.scopes import Scope, Scopes, namespace_patterns
from mesh.memory.store import MemoryStore
from mesh.runtime.client import MeshClient
from mesh.services.memory import MemoryService, memory_agent
from mesh.testing import SecureServer, running_agent, secure_nats_server
from mesh.transport.auth import Keyring
from mesh.transport.keys import KeyDirectory
from mesh.wire.errors import ConfigError, MemoryRefused, MemoryUnavailable
from mesh.wire.settings import Settings


def test_a_declared_scope_narrows_what_the_operator_allows() -> None:
    operator_says = Scopes.parse("research=acme/customer-*|kb").of("research")
    both = Scope(operator_says.tenant, operator_says.namespaces, declared=("customer-*",))
    assert both.allows("customer-ada") and not both.allows("kb")  # kb: the agent did not declare it
    assert Scope("default", declared=("kb",)).allows("kb")  # no operator entry: the declaration alone
    assert not Scope("default", declared=()).allows("kb")  # declared none: no namespace
    assert Scope("default", declared=()).check("x", "_working") == "_working"  # its working memory
    with pytest.raises(MemoryRefused, match="declares memory_scopes customer-"):
        both.check("research", "kb")
    with pytest.raises(MemoryRefused, match="MESH_MEMORY_SCOPES"):
        both.check("research", "other")


def test_memory_scopes_are_checked_when_the_agent_is_declared() -> None:
    assert Agent("reader", memory_scopes=["kb", "customer-*", "kb"]).memory_scopes == ("customer-*", "kb")
    assert Agent("plain").memory_scopes is None
    for bad in ("kb", ["a*b"], [""], ["with space"], ["x" * 200], [3]):
        with pytest.raises(ConfigError, match="memory_scopes"):
            Agent("reader", memory_scopes=bad)  # type: ignore[arg-type]
    assert namespace_patterns(("a", "b*"), "here") == ("a", "b*")


def test_the_declaration_travels_with_the_identity(tmp_path: Path) -> None:
    """Issued from the declaration into users.json (and its public copy); a changed
    declaration is a change of the users (the server reloads, the memory service reads it)."""
    settings = Settings.load(environ={}, data_dir=tmp_path)
    keyring = Keyring(tmp_path / "auth")
    reader = Agent("reader", memory_scopes=["customer-*"])
    with keyring.locked():
        assert keyring.issue_agent(grant_of(reader), settings)
        assert not keyring.issue_agent(grant_of(reader), settings)  # unchanged
    rows = json.loads((tmp_path / "auth" / "public" / "users.json").read_text())
    assert [r["memory"] for r in rows if r["identity"] == "agent:reader"] == [["customer-*"]]
    directory = KeyDirectory(tmp_path / "auth" / "public" / "users.json")
    assert directory.memory_scopes("reader") == ("customer-*",)
    with keyring.locked():
        assert keyring.issue_agent(grant_of(Agent("reader", memory_scopes=["kb"])), settings)
        assert keyring.issue_agent(grant_of(Agent("plain")), settings)
    assert directory.memory_scopes("reader") == ("kb",)  # read again: the file changed
    assert directory.memory_scopes("plain") is None


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:
    settings = Settings.load(
        environ={},
        trace_exporter="none",
        log_level="warning",
        connect_timeout=2.0,
        memory_agent="memory",
        memory_tenants="default,acme",
        memory_timeout=15.0,  # the first call opens the store: a busy machine takes a while
    )
    with secure_nats_server(tmp_path_factory.mktemp("scopes"), settings) as mesh:
        yield mesh


async def test_the_memory_service_holds_an_agent_to_its_declared_scopes(secure: SecureServer) -> None:
    """reader is in tenant acme and declares customer-*: it may remember and recall there and
    nowhere else, though the operator also gives it kb. plain (tenant default) declares nothing
    and keeps every namespace of its own tenant: naming acme in the body, or signing as
    reader, reaches none of acme's memories."""
    reader = Agent("reader", memory_scopes=["customer-*"])
    plain = Agent("plain")
    service = MemoryService(
        lambda: MemoryStore.from_settings(secure.settings).open(),
        scopes=Scopes.parse("reader=acme/customer-*|kb, *=default"),
    )
    agent = memory_agent(service, "memory")
    try:
        async with running_agent(agent, await secure.agent(agent)):
            as_reader = await MeshClient.connect(await secure.agent(reader), "reader")
            as_plain = await MeshClient.connect(await secure.agent(plain), "plain")
            try:
                memory = Memory(as_reader, secure.settings)
                await memory.remember("Ada's order shipped on May 2", namespace="customer-ada")
                [hit] = await memory.recall("order shipped", namespace="customer-ada")
                assert hit.provenance.agent == "reader"
                for attempt in (
                    memory.recall("order", namespace="kb"),
                    memory.remember("planted", namespace="kb"),
                    memory.forget(where={"kind": "fact"}, namespace="default"),
                ):
                    with pytest.raises(MemoryRefused) as refused:
                        await attempt
                    assert refused.value.kind == "not_allowed"
                other = Memory(as_plain, secure.settings, tenant="acme")  # the body's tenant is ignored
                await other.remember("the knowledge base says hello", namespace="kb")
                assert [h.text for h in await other.recall("hello", namespace="kb")] == [
                    "the knowledge base says hello"
                ]
                assert await other.recall("order shipped", namespace="customer-ada") == []  # not acme's
                # plain signing as reader is refused before the service reads it (no answer)
                as_plain.sender = "reader"
                with pytest.raises(MemoryUnavailable, match="no answer"):
                    await Memory(as_plain, secure.settings.model_copy(update={"memory_timeout": 1.0})).recall(
                        "order shipped", namespace="customer-ada"
                    )
            finally:
                await as_reader.close()
                await as_plain.close()
    finally:
        await service.close()
