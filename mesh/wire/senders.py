"""Who a message is from, as the mesh acts on it: the one place that names a delivery's sender.

Everything that decides by identity (who approved a tool call, whose memory a request reads,
who an audit record names) asks `sender_of`, never a body field. Today it is the
``Mesh-Sender`` header; once envelopes are signed, the delivery ladder refuses a message whose
signature does not match the sender it names before anything reads it, and this is then the
authenticated identity (docs/security.md).
"""

from __future__ import annotations

from mesh.wire.envelope import Envelope


def sender_of(env: Envelope) -> str:
    """The identity that sent `env` (an agent's name, or a role's client name)."""
    return env.sender
