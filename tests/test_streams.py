"""The streams' limits (mesh.transport.streams), on a real nats-server and on MemoryBus: a
full work queue refuses, a full history stream drops its oldest, and a stream made with
other limits is kept and reported."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path

import pytest
from nats.js.api import StreamConfig

from mesh.testing import MemoryBus, secure_nats_server
from mesh.transport import nats as nats_transport
from mesh.transport import streams
from mesh.transport.base import Transport
from mesh.transport.jetstream import edit_command, limits_differ
from mesh.transport.nats import NatsTransport
from mesh.wire import envelope as h
from mesh.wire.errors import StreamFull
from mesh.wire.settings import Settings

Connect = Callable[..., Awaitable[Transport]]
BODY = b"x" * 1000


@pytest.fixture(params=["nats", "memory"])
async def connect(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Connect]:
    """A transport on a bus of its own (the streams are made with this test's limits)."""
    opened: list[Transport] = []
    with ExitStack() as stack:
        # the operator makes the streams, as `mesh up` does on a server with authentication
        srv = stack.enter_context(secure_nats_server(tmp_path / "nats")) if request.param == "nats" else None
        url, creds = (srv.url, srv.role("operator").nats_creds) if srv is not None else ("", None)

        async def new(**limits: object) -> Transport:
            settings = Settings.load(environ={}, data_dir=tmp_path, nats_creds=creds, **limits)
            t: Transport = (
                MemoryBus(settings).transport()
                if request.param == "memory"
                else await NatsTransport.connect(settings, "limits", url=url)
            )
            opened.append(t)
            return t

        yield new
        for t in opened:
            await t.close()


def _headers(n: int) -> dict[str, str]:
    return {h.TYPE: "test.ping", h.ID: f"m{n}", h.NATS_MSG_ID: f"m{n}"}


async def test_a_full_inbox_refuses_at_once_and_keeps_what_it_holds(connect: Connect) -> None:
    t = await connect(stream_max_bytes=8 * 1024)
    stored = 0
    with pytest.raises(StreamFull, match="the stream is full"):
        for n in range(20):
            await t.store(f"mesh.c{n}.agent.billing", BODY, _headers(n))
            stored += 1
    assert 4 <= stored < 9
    first = await t.stored(streams.INBOX, 1)  # nothing queued was dropped to make room
    assert first.data == BODY
    assert getattr(t, "publish_retries", 0) == 0  # refused, not retried as an outage


async def test_one_conversation_cannot_fill_an_agent_s_inbox(connect: Connect) -> None:
    t = await connect(stream_max_msgs_per_subject=3)
    for n in range(3):
        await t.store("mesh.flood.agent.billing", BODY, _headers(n))
    with pytest.raises(StreamFull, match="per subject"):
        await t.store("mesh.flood.agent.billing", BODY, _headers(3))
    await t.store("mesh.calm.agent.billing", BODY, _headers(4))  # another conversation
    await t.store("mesh.flood.agent.shipping", BODY, _headers(5))  # another agent


async def test_a_full_event_stream_drops_its_oldest(connect: Connect) -> None:
    t = await connect(stream_max_bytes=8 * 1024)
    for n in range(20):
        await t.store("mesh.c1.evt.test.ping", BODY, _headers(n))  # never refused
    assert await t.stored_next(streams.EVENTS, 1, "mesh.>") is not None
    oldest = await t.stored_next(streams.EVENTS, 1, "mesh.>")
    assert oldest.seq > 1  # the first ones made room for the last
    last = await t.stored_last(streams.EVENTS, "mesh.c1.evt.test.ping")
    assert last.headers[h.ID] == "m19"


def test_the_streams_get_their_limits_from_the_settings() -> None:
    settings = Settings.load(
        environ={},
        stream_max_bytes=1000,
        stream_max_msgs_per_subject=7,
        dlq_retention=3600,
        event_retention=7200,
    )
    specs = {s.name: s for s in streams.stream_specs(settings)}
    inbox, events, timers, dlq = (
        specs[n] for n in (streams.INBOX, streams.EVENTS, streams.TIMERS, "MESH_DLQ")
    )
    assert inbox.limits() == {"max_bytes": 1000, "max_age": 0, "max_msgs_per_subject": 7, "discard": "new"}
    assert timers.limits() == inbox.limits()
    assert events.limits() == {
        "max_bytes": 1000,
        "max_age": 7200,
        "max_msgs_per_subject": 0,
        "discard": "old",
    }
    assert dlq.limits() == {"max_bytes": 1000, "max_age": 3600, "max_msgs_per_subject": 0, "discard": "old"}
    default = {s.name: s for s in streams.stream_specs(Settings.load(environ={}))}
    assert default[streams.INBOX].max_bytes == 1 << 30
    assert default[streams.INBOX].max_msgs_per_subject == 100_000


class Logged:
    """Stands in for a module's structlog logger (whose configuration other tests change)."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        return lambda event, **fields: self.events.append({"event": event, "level": level, **fields})


async def test_a_stream_made_with_other_limits_is_kept_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    logged = Logged()
    monkeypatch.setattr(nats_transport, "log", logged)
    with secure_nats_server(tmp_path) as server:
        settings = server.role("operator")  # the streams are the operator's to make
        t = await NatsTransport.connect(settings, "upgrade")
        try:
            # as an older version made it: no size limits
            old = StreamConfig(name=streams.INBOX, subjects=["mesh.*.agent.*"], retention="workqueue")
            await t._js.add_stream(old)
            await t.ensure_streams()
            logs = logged.events
            [warning] = [e for e in logs if str(e["event"]).startswith("stream limits differ")]
            assert warning["level"] == "warning"
            assert warning["stream"] == streams.INBOX
            differ = warning["differ"]
            assert isinstance(differ, dict)
            assert differ["max_bytes"] == f"has no limit, settings ask for {1 << 30}"
            assert differ["discard"] == "has old, settings ask for new"
            inbox = next(s for s in streams.stream_specs(settings) if s.name == streams.INBOX)
            assert warning["fix"] == edit_command(inbox)
            assert "--max-bytes=1073741824" in str(warning["fix"])
            info = await t._js.stream_info(streams.INBOX)
            assert info.config.max_bytes == -1  # kept as it was
            assert not [e for e in logs if e.get("stream") == streams.EVENTS]  # made now, as asked
            for spec in streams.stream_specs(settings)[1:]:  # read back, the same limits
                assert limits_differ(spec, (await t._js.stream_info(spec.name)).config) == {}
        finally:
            await t.close()
