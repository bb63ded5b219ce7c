"""The keeper registry: which pattern takes a message none of the handlers take."""

from __future__ import annotations

import pytest

from mesh.join import JoinTimer
from mesh.patterns.approval import ApprovalDecision, ApprovalTimer
from mesh.runtime.keepers import Keepers, Outcome
from mesh.transport.delivery import Later
from mesh.wire import envelope as h
from mesh.wire.errors import RegistrationError
from mesh.wire.messages import Message


class Keeper:
    def __init__(self, takes: tuple[type[Message], ...], answers: bool, mine: bool = True) -> None:
        self.takes = takes
        self.answers = answers
        self.mine = mine

    def owns(self, env: h.Envelope) -> bool:
        return self.mine and (not env.answer or env.answer.startswith("chair."))

    async def receive(self, env: h.Envelope, ctx: object) -> Outcome | Later:
        return "handled"


def envelope(type_name: str, **headers: str) -> h.Envelope:
    return h.open_envelope("mesh.c1.agent.chair", b"{}", {h.TYPE: type_name, h.ID: "m1", **headers}, "", "")


def test_a_message_goes_to_the_keeper_of_its_type() -> None:
    joins, approvals = Keeper((JoinTimer,), answers=True), Keeper((ApprovalDecision, ApprovalTimer), False)
    keepers = Keepers()
    keepers.add(joins)
    keepers.add(approvals)
    assert keepers.find(envelope("mesh.join_timer")) is joins
    assert keepers.find(envelope("approval.decision")) is approvals
    assert keepers.find(envelope("mesh.approval_timer")) is approvals
    assert keepers.find(envelope("ticket.opened")) is None  # a handler's


def test_an_answer_to_a_fan_out_is_the_joins_whatever_its_type() -> None:
    joins, approvals = Keeper((JoinTimer,), answers=True), Keeper((ApprovalDecision,), False)
    keepers = Keepers()
    keepers.add(approvals)
    keepers.add(joins)
    assert keepers.find(envelope("approval.decision", **{h.ANSWER: "chair.j1/0"})) is joins
    assert keepers.find(envelope("work.done", **{h.ANSWER: "chair.j1/2"})) is joins
    # an answer for another agent's join is not this agent's: it goes by its type
    assert keepers.find(envelope("work.done", **{h.ANSWER: "other.j1/2"})) is None


def test_a_keeper_can_refuse_a_message_of_its_type() -> None:
    keepers = Keepers()
    keepers.add(Keeper((ApprovalDecision,), answers=False, mine=False))  # e.g. an agent without tools
    assert keepers.find(envelope("approval.decision")) is None


def test_two_keepers_cannot_take_one_type() -> None:
    keepers = Keepers()
    keepers.add(Keeper((JoinTimer,), answers=True))
    with pytest.raises(RegistrationError, match=r"mesh\.join_timer"):
        keepers.add(Keeper((JoinTimer,), answers=False))
