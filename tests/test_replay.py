"""Replay (mesh.agent.replay): a checked-in recording replayed through today's agents, the
comparison on its own, and what a user who gets the command wrong is told."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import TESTS, mesh_cli
from mesh_user_tools import agent as clerk
from sample_agents.echo import Ping, Pong
from sample_agents.echo import agent as echo
from sample_agents.lookback import checker, planner

from mesh import Agent, Context, Message, message
from mesh.agent.diff import compare
from mesh.agent.replay import Recording, replay
from mesh.observability import history
from mesh.observability import record as rec
from mesh.runtime.client import MeshClient
from mesh.testing import replay_file, running_agent
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


def _copy(msg_id: str, subject: str, body: bytes = b"{}", **headers: str) -> rec.Copy:
    base = {h.ID: msg_id, h.TYPE: "test.checked", h.VERSION: "1", h.SENDER: "checker", **headers}
    return rec.Copy(subject, base, body)


def _handling(seq: int, handled: str, *sent: rec.Copy) -> Stored:
    """A record entry of checker's: handling message `handled`, it sent `sent` in this order."""
    received = rec.Copy("mesh.c.agent.checker", {h.ID: handled, h.SENDER: "planner"}, b"{}")
    entry = rec.Entry(received=received, sent=list(sent), outcome=rec.HANDLED, delivery=1)
    return Stored("mesh_record.c.checker", rec.encode_entry(entry), None, seq, 0.0)


def test_compare_names_each_kind_of_difference() -> None:
    """Messages are compared by slot: the same handling's n-th send, then and now."""
    planner, inbox = "mesh.c.agent.planner", {h.REPLY_TO: "_INBOX.x.1"}
    then = history.merge(
        [
            _handling(
                1,
                "in-1",
                _copy("a", planner, b'{"ok": true, "items": [1, 2], "due_ms": 1}'),
                _copy("c", planner, **inbox),
            ),
            _handling(2, "in-2", _copy("d", planner), _copy("b", planner)),
        ]
    )
    now = history.merge(
        [
            _handling(
                1,
                "in-1",
                _copy("a", planner, b'{"ok": false, "items": [1, 3], "due_ms": 2}'),
                _copy("c2", "mesh.c.agent.writer", **{h.REPLY_TO: "_INBOX.y.2"}),
            ),
            _handling(2, "in-2", _copy("d", planner, **{h.TYPE: "test.other"})),
            _handling(3, "in-3", _copy("e", planner)),
        ]
    )
    found = {(d.change, d.message, d.path) for d in compare(then, now, frozenset({"due_ms"}))}
    assert found == {
        ("field", "a", "ok"),
        ("field", "a", "items[1]"),
        ("routing", "c", "subject"),  # the requester's inbox differs in every run: not a difference
        ("type", "d", "type"),
        ("missing", "b", ""),
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


@message("test.replay_question")
class Question(Message, frozen=True):
    text: str


@message("test.replay_answer")
class Answer(Message, frozen=True):
    text: str
    by: int


def _asker(shout: bool) -> Agent:
    agent = Agent("asker", description="asks echo and passes its answer on")

    @agent.handler(events=False)
    async def on_question(q: Question, ctx: Context) -> Answer:
        pong = await ctx.request("echo", Ping(text=q.text.upper() if shout else q.text), Pong)
        return Answer(text=pong.text, by=pong.pid)

    return agent


async def test_an_agent_not_under_test_answers_from_the_recording(
    settings: Settings, client: MeshClient, operator: MeshClient
) -> None:
    """Only the asker is replayed: its request to echo (not running on the isolated mesh) is
    answered with echo's recorded answer. A version that asks something else is told the
    same (the answer is the recorded one), and the changed question is the difference."""
    async with running_agent(_asker(False), settings), running_agent(echo, settings):
        await client.send("asker", Question(text="hi"), conversation="stand-in")
        for _ in range(200):
            msgs = await history.conversation(client.transport, "stand-in")
            if history.summarize("stand-in", msgs).status == history.DONE and len(msgs) == 4:
                break
            await asyncio.sleep(0.05)
    recording = await Recording.from_mesh(operator.transport, "stand-in", settings)  # type: ignore[arg-type]
    same = await replay(recording, {"asker": _asker(False)})
    same.assert_same()
    assert same.inputs == 1 and same.recorded == same.replayed == 2  # the request and the answer
    changed = await replay(recording, {"asker": _asker(True)})
    assert [(d.change, d.type, d.path, d.recorded, d.replayed) for d in changed.differences] == [
        ("field", "test.ping", "text", "hi", "HI")
    ]
