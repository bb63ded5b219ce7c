"""What the web view shows of a conversation, as JSON: its summary, its messages in causal
order (each with its depth in the tree, its body and what became of each delivery) and the
approvals still waiting for a decision."""

from __future__ import annotations

from typing import Any

from mesh.observability import history
from mesh.observability.conversation import causal_tree

_REQUEST = "approval.request"
_RESOLVED = "approval.resolved"


def conversation_json(conversation: str, messages: list[history.Recorded]) -> dict[str, Any]:
    """The summary's fields (as `GET /v1/conversations/{id}` gives them), with ``messages``
    the list of messages rather than their count, and ``waiting`` the undecided approvals."""
    summary = history.summarize(conversation, messages)
    by_id = {m.id: m for m in messages}
    tree = causal_tree(m.line() for m in messages)
    resolved = {_approval_of(m) for m in messages if m.type == _RESOLVED}
    waiting = []
    for m in messages:
        approval = _approval_of(m)
        if m.type == _REQUEST and approval and approval not in resolved:
            body = m.body()
            waiting.append(
                {
                    "approval": approval,
                    "request": m.id,
                    "agent": str(body.get("agent", "")),
                    "tool": str(body.get("tool", "")),
                    "arguments": str(body.get("arguments", "")),
                    "expires_ms": body.get("expires_ms", 0),
                }
            )
    return {
        **summary.to_dict(),
        "messages": [_message(by_id[line.id], line.receiver, depth) for depth, line in tree],
        "waiting": waiting,
    }


def _message(m: history.Recorded, receiver: str, depth: int) -> dict[str, Any]:
    return {
        "id": m.id,
        "depth": depth,
        "type": m.type,
        "sender": m.sender,
        "receiver": receiver,
        "subject": m.subject,
        "causation": m.causation,
        "sent_ns": m.sent_ns,
        "trace_id": m.trace_id,
        "body": m.body(),
        "deliveries": [
            {
                "agent": d.agent,
                "outcome": d.outcome,
                "attempt": d.attempt,
                "ms": round(d.millis, 3),
                "reason": d.reason,
                "input_tokens": d.input_tokens,
                "output_tokens": d.output_tokens,
                "cost_usd": d.cost_usd,
            }
            for d in m.deliveries
        ],
    }


def _approval_of(m: history.Recorded) -> str:
    if m.type not in (_REQUEST, _RESOLVED):
        return ""
    body = m.body()
    return str(body.get("approval", "")) if isinstance(body, dict) else ""
