"""Replay (mesh.agent.replay): a checked-in recording replayed through today's agents, the
comparison on its own, and what a user who gets the command wrong is told."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TESTS, mesh_cli
from mesh_user_tools import agent as clerk
from sample_agents.lookback import checker, planner

from mesh.agent.replay import Recording, compare
from mesh.observability import history
from mesh.observability import record as rec
from mesh.testing import replay_file
from mesh.transport.memstreams import Stored
from mesh.wire import envelope as h
from mesh.wire.errors import ConfigError
from mesh.wire.settings import Settings

REFUND_CASE = TESTS / "recordings" / "refund-case.json"


async def test_a_checked_in_recording_replays_through_todays_agents() -> None:
    """tests/recordings/refund-case.json: `mesh record --export` of the look-back
    conversation (a fan-out with a redelivered branch, a refund parked for approval and
    approved). Today's planner, checker and clerk, run together, send what they sent then."""
    report = await replay_file(REFUND_CASE, {"planner": planner, "checker": checker, "clerk": clerk})
    report.assert_same()
    assert report.inputs == 2  # the case from the client, the decision from `mesh approve`
    assert report.recorded == report.replayed >= 9


def _sent(msg_id: str, subject: str, body: bytes, **headers: str) -> Stored:
    base = {h.ID: msg_id, h.TYPE: "test.checked", h.VERSION: "1", h.SENDER: "checker", **headers}
    return Stored(
        "mesh_record.c.checker",
        rec.encode_entry(rec.Entry(sent=[rec.Copy(subject, base, body)])),
        None,
        1,
        0.0,
    )


def test_compare_names_each_kind_of_difference() -> None:
    then = history.merge(
        [
            _sent("a", "mesh.c.agent.planner", b'{"ok": true, "items": [1, 2], "due_ms": 1}'),
            _sent("b", "mesh.c.agent.planner", b"{}"),
            _sent("c", "mesh.c.agent.planner", b"{}", **{h.REPLY_TO: "_INBOX.x.1"}),
            _sent("d", "mesh.c.agent.planner", b"{}"),
        ]
    )
    now = history.merge(
        [
            _sent("a", "mesh.c.agent.planner", b'{"ok": false, "items": [1, 3], "due_ms": 2}'),
            _sent("c", "mesh.c.agent.writer", b"{}", **{h.REPLY_TO: "_INBOX.y.2"}),
            _sent("d", "mesh.c.agent.planner", b"{}", **{h.TYPE: "test.other"}),
            _sent("e", "mesh.c.agent.planner", b"{}"),
        ]
    )
    found = {(d.change, d.message, d.path) for d in compare(then, now, frozenset({"due_ms"}))}
    assert found == {
        ("field", "a", "ok"),
        ("field", "a", "items[1]"),
        ("missing", "b", ""),
        ("routing", "c", "subject"),  # the requester's inbox differs in every run: not a difference
        ("type", "d", "type"),
        ("extra", "e", ""),
    }
    lines = [d.line() for d in compare(then, now, frozenset({"due_ms"}))]
    assert "~ checker test.checked a: ok: true → false" in lines


def test_a_file_that_is_not_a_recording_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(ConfigError, match="not a conversation written by `mesh record --export`"):
        Recording.load(bad)
    recording = Recording.load(REFUND_CASE)  # and a good one round-trips
    again = tmp_path / "again.json"
    again.write_bytes(recording.dumps())
    assert Recording.load(again).entries == recording.entries


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["replay", str(REFUND_CASE), "--agent", "checker"], "write NAME=SPEC"),
        (["replay", str(REFUND_CASE), "--agent", "writer=sample_agents.lookback:checker"], "use checker="),
        (["replay", str(REFUND_CASE), "--agent", "checker=no_such_module:agent"], "cannot import module"),
        (["replay", str(REFUND_CASE)], "--agent"),
    ],
)
async def test_replay_says_what_to_do_about_a_wrong_command(
    settings: Settings, args: list[str], expected: str
) -> None:
    done = await mesh_cli(settings, *args)
    assert done.returncode == 2 and expected in done.stderr, done.stderr


async def test_replay_of_an_unknown_conversation_says_where_to_look(settings: Settings) -> None:
    done = await mesh_cli(
        settings, "replay", "no-such-conversation", "--agent", "checker=sample_agents.lookback:checker"
    )
    assert done.returncode == 2 and "mesh conversations" in done.stderr, done.stderr
