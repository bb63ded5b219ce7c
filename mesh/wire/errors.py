"""The exception tree. Every error the mesh raises on purpose is a `MeshError`."""

from __future__ import annotations


class MeshError(Exception):
    """Root of every error raised by mesh."""


class ConfigError(MeshError):
    """A setting or declaration is invalid; the message says which and how to fix it."""


class RegistrationError(ConfigError):
    """A handler or message type could not be registered."""


class ServerError(MeshError):
    """The NATS server could not be started, found or reached."""


class ServerUnavailable(ServerError):
    """JetStream cannot store or answer now: no leader or no quorum on a cluster, or no
    answer in time. Trying again later (with the same message id) can succeed."""


class StreamFull(ServerError):
    """A stream refused a message because it reached one of its limits (MESH_STREAM_MAX_BYTES,
    MESH_STREAM_MAX_MSGS_PER_SUBJECT): not retried, since only its agent taking work frees room."""


class PublishError(MeshError):
    """A message was refused before it was sent: the server would not take it (a subject or
    message too large), and sending it would have cost the connection."""


class DeliveryError(MeshError):
    """A message could not be accepted for processing.

    `kind` is a short machine-readable reason that also appears on dead letters:
    ``decode``, ``validation``, ``unknown_type``, ``oversize``, ``hop_limit``,
    ``deadline_expired``, ``bad_header``, ``bad_subject``, ``depth_limit``, ``handler_error``,
    ``max_deliveries``, ``rejected``, ``drain_timeout``, ``budget_exceeded`` or
    ``loop_detected``.
    """

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class DecodeError(DeliveryError):
    """Bytes did not decode into the declared message type."""


class UnknownTypeError(DeliveryError):
    """A message names a type this process does not know."""


class Reject(DeliveryError):
    """Raise from a handler to dead-letter the message at once, without retries:
    ``raise mesh.Reject("order 17 does not exist")``."""

    def __init__(self, reason: str, kind: str = "rejected") -> None:
        super().__init__(kind, reason)


class BudgetExceeded(DeliveryError):
    """A conversation's or a tenant's model budget (MESH_BUDGET_*) is spent: the model is
    not called, and the message is dead-lettered as ``budget_exceeded`` at once (a retry
    would find the budget spent too); a requester gets `RequestFailed` with that kind."""

    def __init__(self, reason: str) -> None:
        super().__init__("budget_exceeded", reason)


class RequestError(MeshError):
    """A request over an agent's direct line got no (valid) answer in time."""


class RequestFailed(RequestError):
    """The agent could not handle the request (it was dead-lettered): `kind` is the dead
    letter's kind (``validation``, ``handler_error``...) and `reason` says why."""

    def __init__(self, agent: str, kind: str, reason: str) -> None:
        super().__init__(f"agent {agent!r} could not handle the request ({kind}): {reason}")
        self.agent = agent
        self.kind = kind
        self.reason = reason


class RequestRefused(RequestError):
    """The agent answered a request with one of the error types the requester declared
    (`request(..., errors=(...))`); `answer` is that typed error message."""

    def __init__(self, agent: str, answer: object) -> None:
        super().__init__(f"agent {agent!r} answered with {type(answer).__name__}: {answer!r}")
        self.agent = agent
        self.answer = answer


class MemoryFault(MeshError):
    """A shared-memory operation failed. `kind` is machine-readable: ``unavailable``,
    ``oversize``, ``dimension``, ``unknown_tenant``, ``bad_filter``, ``invalid`` or
    ``internal``."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


class MemoryUnavailable(MemoryFault):
    """The memory service did not answer in time (down, or none running)."""

    def __init__(self, reason: str) -> None:
        super().__init__("unavailable", reason)


class MemoryRefused(MemoryFault):
    """The memory service answered with a typed error: bad input it will not store or run."""
