"""What JetStream's API answers mean, and how an existing stream's limits compare with the
settings: error codes, the errors the transport raises for them, the `nats` command that
changes a stream's limits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import nats
import nats.errors
import nats.js.errors

from mesh.transport.streams import StreamSpec
from mesh.wire.errors import ServerError, ServerUnavailable

# JetStream API error codes (nats-server's errors.json)
JS_CLUSTER_NOT_AVAILABLE = 10008  # "JetStream system temporarily unavailable": no meta leader
JS_NOT_ENABLED_FOR_ACCOUNT = 10039  # "JetStream not enabled for account"
# a 409: a publish with this Nats-Msg-Id is still being replicated (a leader without a quorum)
JS_DUPLICATE_IN_PROCESS = 10158  # "duplicate message id is in process"
JS_STORE_FAILED = 10077  # a 503 "maximum bytes exceeded", "maximum messages per subject exceeded"
JS_STREAM_NAME_IN_USE = 10058  # "stream name already in use with a different configuration"

NO_LEADER = (
    "The stream has no quorum or no leader: on a cluster, fewer than half of the servers "
    "holding its replicas are up, or they are electing a leader"
)
NO_JETSTREAM = (
    "the NATS server has no JetStream, which the mesh needs for durable inboxes, events "
    "and dead letters: start nats-server with -js (or `jetstream {}` in its config)"
)


def unavailable(exc: Any, stream: str) -> ServerError:
    """What a 503 from the JetStream API means: no JetStream at all (nobody answered; the
    client reports the no-responders status as a 503 without an error code), none for this
    account, or a cluster without a meta leader."""
    code = getattr(exc, "err_code", None)
    if code is None:
        return ServerError(NO_JETSTREAM)
    if code == JS_NOT_ENABLED_FOR_ACCOUNT:
        return ServerError(
            "JetStream is not enabled for the NATS account this process uses: enable it for the "
            "account (a `jetstream` block in the account's configuration, or its JWT limits)"
        )
    if code == JS_CLUSTER_NOT_AVAILABLE:
        return ServerUnavailable(
            f"the JetStream cluster has no meta leader, so stream {stream} cannot be created or "
            f"checked: fewer than half of its servers are up (no quorum), or they are electing a "
            f"leader. It works again once a majority of the servers is back"
        )
    return ServerUnavailable(
        f"JetStream could not create or check stream {stream}: 503, error {code} "
        f"({getattr(exc, 'description', '')})"
    )


def limits_differ(spec: StreamSpec, config: Any) -> dict[str, str]:
    """The limits of an existing stream (`config`, a StreamConfig) that are not the ones
    `spec` asks for: {limit: "has X, settings ask for Y"}."""
    age = float(config.max_age or 0)  # the server keeps nanoseconds: within a second is the same
    has: dict[str, object] = {
        "max_bytes": max(0, int(config.max_bytes or 0)),
        "max_age": spec.max_age if abs(age - spec.max_age) < 1 else age,
        "max_msgs_per_subject": max(0, int(config.max_msgs_per_subject or 0)),
        "discard": str(getattr(config.discard, "value", config.discard) or "old"),
    }
    return {
        name: f"has {_limit(has[name])}, settings ask for {_limit(want)}"
        for name, want in spec.limits().items()
        if has[name] != want
    }


def _limit(value: object) -> str:
    if value in (0, 0.0):
        return "no limit"
    return f"{value:g}" if isinstance(value, float) else str(value)


def edit_command(spec: StreamSpec) -> str:
    """The `nats` CLI command that gives a stream the limits of `spec`."""
    parts = [
        f"nats stream edit {spec.name}",
        f"--max-bytes={spec.max_bytes or -1}",
        f"--max-age={int(spec.max_age)}s" if spec.max_age else "--max-age=0",
        f"--max-msgs-per-subject={spec.max_msgs_per_subject or -1}",
        f"--discard={'new' if spec.discard_new else 'old'}",
    ]
    if spec.discard_new and spec.max_msgs_per_subject:
        parts.append("--discard-per-subject")
    return " ".join(parts)


@contextlib.contextmanager
def stream_api_errors(stream: str, asked: str, hint: str = "") -> Iterator[None]:
    """What a failed call of the stream API means, as the mesh's errors: no JetStream, no
    meta leader (or no JetStream for the account), or no answer in time."""
    try:
        yield
    except nats.errors.NoRespondersError:
        raise ServerError(NO_JETSTREAM) from None
    except nats.js.errors.ServiceUnavailableError as exc:
        raise unavailable(exc, stream) from None
    except nats.errors.TimeoutError:
        raise ServerUnavailable(
            f"JetStream did not answer in time when asked {asked} stream {stream}: on a cluster, "
            f"its servers may be electing a meta leader, or too few are up for a quorum; else the "
            f"server is overloaded{hint}"
        ) from None
