"""TLS to NATS: a real nats-server that requires TLS, with a certificate from a CA made for
the test (trustme); the client trusts MESH_NATS_TLS_CA, and refuses a server it cannot verify."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from mesh.testing import Recorder
from mesh.transport.nats import NatsTransport
from mesh.transport.server import EmbeddedServer
from mesh.wire.errors import ConfigError, ServerError
from mesh.wire.settings import Settings


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    authority = trustme.CA()
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    authority.cert_pem.write_to_path(str(path))
    return authority, path


@pytest.fixture(scope="module")
def tls_server(
    ca: tuple[trustme.CA, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedServer]:
    directory = tmp_path_factory.mktemp("tls-server")
    issued = ca[0].issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "server.pem", directory / "server.key"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    server = EmbeddedServer(directory / "store", tls=(cert, key))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(server: EmbeddedServer, tmp_path: Path, **extra: object) -> Settings:
    # no authentication on this server: the test is about the channel, and says so
    return Settings.load(
        environ={}, nats_url=server.url, data_dir=tmp_path, connect_timeout=2.0, insecure=True, **extra
    )


async def test_a_client_that_trusts_the_ca_talks_over_tls(
    tls_server: EmbeddedServer, ca: tuple[trustme.CA, Path], tmp_path: Path
) -> None:
    transport = await NatsTransport.connect(_settings(tls_server, tmp_path, nats_tls_ca=ca[1]), "tls")
    try:
        assert transport.nc._server_info.get("tls_required")
        rec = await Recorder.start(transport, "mesh.tls.evt.>")
        await transport.publish("mesh.tls.evt.ping", b"{}", {})
        [msg] = await rec.wait_count(1)
        assert msg.subject == "mesh.tls.evt.ping"
        await rec.stop()
    finally:
        await transport.close()


async def test_a_server_whose_certificate_cannot_be_verified_is_refused(
    tls_server: EmbeddedServer, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    with pytest.raises(ServerError, match=r"does not verify .*MESH_NATS_TLS_CA"):
        await NatsTransport.connect(_settings(tls_server, tmp_path, nats_tls_ca=other), "tls")


def test_tls_settings_are_checked_at_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="MESH_NATS_TLS_CERT and MESH_NATS_TLS_KEY go together"):
        Settings.load(environ={"MESH_NATS_TLS_CERT": str(tmp_path / "c.pem")})
    from mesh.transport.auth import client_options

    missing = Settings.load(environ={}, nats_tls_ca=tmp_path / "nowhere.pem")
    with pytest.raises(ConfigError, match="MESH_NATS_TLS"):
        client_options(missing)
