"""Tap lines and the causal tree built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from mesh.observability.conversation import causal_tree, render_tree
from mesh.observability.tap import format_line, observe
from mesh.wire import envelope as h


@dataclass
class Raw:
    subject: str
    data: bytes
    headers: dict[str, str] | None = field(default_factory=dict)
    reply: str = ""


def _msg(subject: str, id_: str, cause: str, sent: int, sender: str, type_: str) -> Raw:
    return Raw(
        subject,
        b'{"k": "v"}',
        {h.ID: id_, h.CAUSATION: cause, h.SENT_AT: str(sent), h.SENDER: sender, h.TYPE: type_, h.HOP: "1"},
    )


def test_observe_never_raises_on_garbage() -> None:
    line = observe(Raw("not.a.mesh.subject", b"\x00\xff", None))
    assert line.type == "?"
    assert "not json" in line.preview
    line = observe(Raw("mesh.c.agent.x", b"{}", {h.SENT_AT: "soon", h.HOP: "x", h.TRACEPARENT: "bad"}))
    assert (line.sent_ns, line.hop, line.trace_id, line.latency_ms) == (0, 0, "", None)


def test_observe_reads_the_protocol_headers() -> None:
    raw = _msg("mesh.c1.agent.research", "m2", "m1", 1_000_000_000, "triage", "support.research_request")
    raw.headers[h.TRACEPARENT] = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"  # type: ignore[index]
    line = observe(raw, seen_ns=1_002_500_000)
    assert (line.sender, line.receiver, line.conversation) == ("triage", "research", "c1")
    assert line.latency_ms == 2.5
    assert line.trace_id == "a" * 32
    text = format_line(line)
    assert "triage → research" in text and "support.research_request" in text and '{"k":"v"}' in text


def test_dead_letters_show_their_reason() -> None:
    raw = Raw("mesh.c1.dlq.triage", b"{", {h.DLQ_KIND: "decode", h.DLQ_REASON: "truncated"})
    assert "DEAD LETTER (decode: truncated)" in format_line(observe(raw))


def test_causal_tree_orders_parents_before_children_and_shows_timings() -> None:
    lines = [
        observe(_msg("mesh.c.agent.writer", "m3", "m2", 3_000_000, "research", "t.c")),
        observe(_msg("mesh.c.evt.t.a", "m1", "", 1_000_000, "cli", "t.a")),
        observe(_msg("mesh.c.agent.research", "m2", "m1", 2_000_000, "triage", "t.b")),
        observe(_msg("mesh.c.agent.other", "m4", "m1", 2_500_000, "triage", "t.d")),
    ]
    tree = causal_tree(lines)
    assert [(d, line.id) for d, line in tree] == [(0, "m1"), (1, "m2"), (2, "m3"), (1, "m4")]
    text = render_tree(lines)
    assert "cli → evt:t.a" in text.splitlines()[0]
    assert "(+1.0 ms after its cause)" in text


def test_full_bodies_are_decoded_whole_for_json_and_msgpack() -> None:
    import msgspec

    long_text = "x" * 500
    line = observe(Raw("mesh.c.evt.t.a", msgspec.json.encode({"text": long_text})), full=True)
    assert line.body == {"text": long_text}
    assert len(line.preview) < 100
    packed = Raw("mesh.c.evt.t.a", msgspec.msgpack.encode({"n": 1}), {h.CONTENT_TYPE: "application/msgpack"})
    assert observe(packed, full=True).body == {"n": 1}
    assert observe(Raw("mesh.c.evt.t.a", b"\x00"), full=True).body.startswith("<1 bytes")
    assert observe(Raw("mesh.c.evt.t.a", b'"<not a description>"')).preview == '"<not a description>"'
