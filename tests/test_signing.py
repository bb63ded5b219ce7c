"""Signed envelopes alone: the canonical form, signing, verification, the verifier's rules
(who may sign as whom, the replay window) and the signing middleware's place in a chain."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from mesh.middleware.publish import STORE, Outgoing, chain_publish
from mesh.middleware.signing import signing
from mesh.runtime.client import MeshClient
from mesh.runtime.verify import Copy, Verifier
from mesh.transport.auth import new_seed
from mesh.transport.keys import KeyDirectory
from mesh.wire import envelope as h
from mesh.wire.errors import DeliveryError, RequestError
from mesh.wire.signature import (
    REPLY_GRANT,
    SIGNATURE,
    SIGNER,
    BadSignature,
    Signer,
    canonical,
    check_grant,
    verify,
)

SUBJECT = "mesh.c1.agent.vault"


@dataclass
class Msg:
    subject: str
    data: bytes
    headers: dict[str, str]
    stored: bool = True
    origin: str = "MESH_INBOX-1"
    stored_ns: int = 0
    reply: str = ""  # a direct request's NATS reply subject


def headers(sender: str, msg_id: str = "m1", **extra: str) -> dict[str, str]:
    return {h.TYPE: "sec.ping", h.ID: msg_id, h.SENDER: sender, h.SENT_AT: str(time.time_ns()), **extra}


billing, mallory, publisher = Signer(new_seed()), Signer(new_seed()), Signer(new_seed())
directory = KeyDirectory.of(
    {
        billing.public_key: "agent:billing",
        mallory.public_key: "agent:mallory",
        publisher.public_key: "role:publisher",
    }
)


def signed(signer: Signer, hd: dict[str, str], body: bytes = b'{"text":"hi"}', subject: str = SUBJECT) -> Msg:
    signer.sign(subject, hd, body)
    return Msg(subject, body, hd)


def test_the_canonical_form_is_the_documented_lines() -> None:
    hd = {h.TYPE: "a.b", h.ID: "x", h.SENDER: "s", h.REPLY_TO: "r", "X-Other": "not signed"}
    lines = canonical(SUBJECT, hd, b"{}").decode().split("\n")
    assert lines[0] == "mesh-sig-v1" and lines[1] == SUBJECT
    assert lines[2:18] == ["a.b", "", "x", "s", "", "", "", "", "", "", "", "r", "", "", "", ""]
    assert lines[18] == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"  # sha256("{}")
    assert len(lines) == 19


def test_a_signature_verifies_and_any_change_breaks_it() -> None:
    m = signed(billing, headers("billing", **{h.REPLY_TO: "mesh.c1.agent.billing"}))
    assert verify(m.subject, m.headers, m.data) == billing.public_key
    assert len(m.headers[SIGNATURE]) == 86 and m.headers[SIGNER].startswith("U")
    changes = [
        (m.subject.replace("vault", "other"), m.headers, m.data),
        (m.subject, m.headers, m.data + b" "),
        (m.subject, {**m.headers, h.REPLY_TO: "_INBOX.x.y"}, m.data),
        (m.subject, {**m.headers, h.ANSWER: "vault.j1/0"}, m.data),
        (m.subject, {**m.headers, SIGNER: mallory.public_key}, m.data),
        (m.subject, {**m.headers, SIGNATURE: "A" * 86}, m.data),
        (m.subject, {**m.headers, SIGNATURE: m.headers[SIGNATURE][:-2] + ".\n"}, m.data),
        (m.subject, {**m.headers, SIGNER: "U" + "A" * 55}, m.data),
        (m.subject, {k: v for k, v in m.headers.items() if k != SIGNATURE}, m.data),
    ]
    for subject, hd, body in changes:
        with pytest.raises(BadSignature):
            verify(subject, hd, body)
    # headers outside the signed set may change (trace context, Nats-Msg-Id)
    assert verify(m.subject, {**m.headers, "traceparent": "00-x", h.NATS_MSG_ID: "n2"}, m.data)


def test_the_verifier_binds_the_sender_to_the_signer() -> None:
    v = Verifier(directory, window=60)
    assert v.check(signed(billing, headers("billing", "a1"))) == "agent:billing"
    assert v.check(signed(publisher, headers("helpdesk", "a2"))) == "role:publisher"
    refused = [
        signed(mallory, headers("billing", "a3")),  # an agent signs only as itself
        signed(publisher, headers("billing", "a4")),  # a role never as an agent
        signed(Signer(new_seed()), headers("stranger", "a5")),  # an unknown key
        Msg(SUBJECT, b"{}", headers("billing", "a6")),  # unsigned
    ]
    for m in refused:
        with pytest.raises(DeliveryError) as err:
            v.check(m)
        assert err.value.kind == "unauthenticated"


def test_a_role_asks_for_replies_only_in_its_own_reply_space() -> None:
    v = Verifier(directory, window=60)
    own = f"_INBOX.{publisher.public_key}.r1"
    assert v.check(signed(publisher, headers("helpdesk", "b1", **{h.REPLY_TO: own})))
    with pytest.raises(DeliveryError) as err:
        v.check(
            signed(publisher, headers("helpdesk", "b2", **{h.REPLY_TO: f"_INBOX.{mallory.public_key}.r"}))
        )
    assert err.value.kind == "unauthorized"


def test_a_reply_target_passed_on_needs_the_grant_of_whoever_owns_it() -> None:
    """An agent in the middle of a conversation cannot point an answer at anyone who did not
    ask: a reply target outside the signer's own space passes only with its owner's grant,
    made for this conversation."""
    v = Verifier(directory, window=60)
    billing_inbox, helpdesk = "mesh.c1.agent.billing", f"_INBOX.{publisher.public_key}.r1"
    n = iter(range(100))

    def sent(
        signer: Signer, sender: str, target: str, grant: str | None = None, subject: str = SUBJECT
    ) -> Msg:
        extra = {h.REPLY_TO: target, **({REPLY_GRANT: grant} if grant is not None else {})}
        return signed(signer, headers(sender, f"g{next(n)}", **extra), subject=subject)

    # in its own space, no grant needed: an agent's inbox, a role's reply and event subjects
    assert v.check(sent(billing, "billing", billing_inbox)) == "agent:billing"
    assert v.check(sent(billing, "billing", f"_INBOX.{billing.public_key}.x"))
    assert v.check(sent(publisher, "helpdesk", "mesh.c1.reply.t1"))
    assert v.check(sent(publisher, "helpdesk", "mesh.c1.evt.sec.pong"))
    # passed on by another agent with the owner's grant for this conversation
    assert v.check(sent(mallory, "mallory", billing_inbox, billing.grant("c1"))) == "agent:mallory"
    assert v.check(sent(mallory, "mallory", helpdesk, publisher.grant("c1")))
    refused = [
        sent(mallory, "mallory", billing_inbox),  # no grant
        sent(mallory, "mallory", billing_inbox, mallory.grant("c1")),  # its own grant
        sent(mallory, "mallory", billing_inbox, billing.grant("c2")),  # made for another conversation
        sent(mallory, "mallory", helpdesk, billing.grant("c1")),  # a grant of someone else's
        sent(mallory, "mallory", billing_inbox, Signer(new_seed()).grant("c1")),  # an unknown key's
        sent(mallory, "mallory", billing_inbox, billing.grant("c1")[:-4] + "AAAA"),  # altered
        sent(publisher, "helpdesk", billing_inbox),  # a role pointing at an agent's inbox
        sent(billing, "billing", "mesh.c1.reply.t1"),  # an agent's reply space is its inbox
    ]
    # a direct request whose NATS reply subject lies in another identity's inbox space
    stolen = signed(mallory, headers("mallory", "g-direct"))
    refused.append(Msg(stolen.subject, stolen.data, stolen.headers, stored=False, origin="", reply=helpdesk))
    for m in refused:
        with pytest.raises(DeliveryError) as err:
            v.check(m)
        assert err.value.kind == "unauthorized", err.value.reason
    own = signed(mallory, headers("mallory", "g-own"))
    assert v.check(
        Msg(
            own.subject,
            own.data,
            own.headers,
            stored=False,
            origin="",
            reply=f"_INBOX.{mallory.public_key}.1",
        )
    )


def test_a_grant_is_one_signature_per_conversation_and_says_who_made_it() -> None:
    g = billing.grant("c1")
    assert g == billing.grant("c1") and g != billing.grant("c2")
    assert len(g) == h.GRANT_LEN and check_grant(g, "c1") == billing.public_key
    # out of the alphabet ("." and a line break are skipped by a lenient decoder): refused
    odd = g[:-3] + ".\nA"
    for bad, conversation in ((g, "c2"), (g[:50], "c1"), ("x" * h.GRANT_LEN, "c1"), (odd, "c1")):
        with pytest.raises(BadSignature):
            check_grant(bad, conversation)


def test_replays_and_stale_messages_are_refused_but_a_redelivery_is_not() -> None:
    v = Verifier(directory, window=60)
    m = signed(billing, headers("billing", "c1"))
    v.check(m)
    v.check(m)  # the same stored message delivered again
    # an identical copy stored a second time (a replay, or a stream that stored one publish
    # twice across a leader change) is skipped as a duplicate: never handled twice
    with pytest.raises(Copy):
        v.check(Msg(m.subject, m.data, dict(m.headers), origin="MESH_INBOX-2"))
    other = signed(billing, headers("billing", "c1"), body=b'{"text":"other"}')  # the id, reused
    direct = Msg(m.subject, m.data, dict(m.headers), stored=False, origin="")
    for replay in (Msg(other.subject, other.data, other.headers, origin="MESH_INBOX-3"), direct):
        with pytest.raises(DeliveryError, match="a replay"):
            v.check(replay)
    old = headers("billing", "c2", **{h.SENT_AT: str(time.time_ns() - 120 * 10**9)})
    with pytest.raises(DeliveryError, match="window"):
        v.check(signed(billing, old))
    # a message that waited in the stream is judged by when the stream stored it
    waited = signed(billing, old)
    waited.stored_ns = int(old[h.SENT_AT]) + 10**9
    assert v.check(waited) == "agent:billing"


async def test_signing_runs_last_and_signs_what_the_chain_left() -> None:
    sent: list[Outgoing] = []

    async def last(out: Outgoing) -> None:
        sent.append(out)

    def stamp(call_next):  # type: ignore[no-untyped-def]
        async def send(out: Outgoing) -> object:
            out.headers[h.ROUTE] = "writer"
            return await call_next(out)

        return send

    send = chain_publish(last, [stamp, signing(billing)])
    await send(Outgoing(SUBJECT, b"{}", headers("billing", "d1"), STORE))
    (out,) = sent
    assert verify(out.subject, out.headers, out.data) == billing.public_key
    assert out.headers[h.ROUTE] == "writer"


def test_signing_and_verifying_cost_microseconds(capsys: pytest.CaptureFixture[str]) -> None:
    """Not a timed assertion: prints the cost per message for docs/security.md."""
    v = Verifier(directory, window=60)
    body = b'{"ticket_id":"T-1","customer":"Ada","subject":"Charged twice","body":"' + b"x" * 400 + b'"}'
    n = 2000
    msgs = [headers("billing", f"e{i}", **{h.CONVERSATION: "c1", h.HOP: "1"}) for i in range(n)]
    t0 = time.perf_counter()
    for hd in msgs:
        billing.sign(SUBJECT, hd, body)
    t1 = time.perf_counter()
    for i, hd in enumerate(msgs):
        v.check(Msg(SUBJECT, body, hd, origin=f"MESH_INBOX-{i}"))
    t2 = time.perf_counter()
    with capsys.disabled():
        print(f"\nsign {(t1 - t0) / n * 1e6:.0f} us, verify {(t2 - t1) / n * 1e6:.0f} us per message")


def test_a_requester_takes_an_answer_only_from_the_agent_it_asked() -> None:
    client = MeshClient(None, "helpdesk")  # type: ignore[arg-type]
    client.directory = directory
    inbox = f"_INBOX.{publisher.public_key}.r1"
    billing_says = signed(billing, headers("billing", "f1"), subject=inbox)
    client._check_answerer(billing_says, "billing", ("billing",))
    refused = [
        (signed(mallory, headers("mallory", "f2"), subject=inbox), "came from agent:mallory"),
        (signed(mallory, headers("billing", "f3"), subject=inbox), "not from billing"),
        (signed(publisher, headers("helpdesk", "f4"), subject=inbox), "came from role:publisher"),
        (Msg(inbox, b"{}", headers("billing", "f5")), "not signed"),
    ]
    for answer, why in refused:
        with pytest.raises(RequestError, match=why):
            client._check_answerer(answer, "billing", ("billing",))
    # the end of a handoff chain, when the requester names it
    client._check_answerer(signed(mallory, headers("mallory", "f6"), subject=inbox), "billing", ("mallory",))
