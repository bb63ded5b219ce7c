"""What became of a delivery, read once from the signals of the ladder's rungs (mesh.runtime.ladder),
for those that report it: the conversation record (`Recorded`, here) and the metrics
(mesh.runtime.metered)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from mesh.runtime.ladder import Duplicate, HandlerFailed, Take, Work
from mesh.transport.delivery import Later
from mesh.wire.errors import DeliveryError

if TYPE_CHECKING:
    from mesh.observability.record import Recorder


class Recorded:
    """Write each handling into the conversation record (mesh.observability.record): what
    became of the delivery (handled, retry, dead_letter or duplicate), the handling time,
    the model usage of the run, and what the handler sent meanwhile, in one entry, before
    the rung above settles it. A delivery still waiting (a timer not due) and one cut short
    by a stop get no outcome: they come again (what they sent is recorded on its own)."""

    def __init__(self, below: Take, recorder: Recorder, max_deliver: int) -> None:
        self.below = below
        self.recorder = recorder
        self.max_deliver = max_deliver

    async def __call__(self, w: Work) -> Later | None:
        started = time.perf_counter_ns()
        token = self.recorder.handling()
        failure: BaseException | None = None
        result: Later | None = None
        try:
            result = await self.below(w)
            return result
        except BaseException as exc:
            failure = exc
            raise
        finally:
            outcome, _, why = settled_as(w, failure, result, self.max_deliver)
            outcome = "" if outcome == "deferred" else outcome  # it comes again: recorded then
            millis = (time.perf_counter_ns() - started) / 1e6
            usage = getattr(w.ctx, "usage", None)
            await self.recorder.handled(token, w.delivery, outcome, reason=why, millis=millis, usage=usage)


def settled_as(
    w: Work, failure: BaseException | None, result: Later | None, max_deliver: int
) -> tuple[str, str, str]:
    """What the rungs above will make of a delivery that ended with `failure` (None: it
    returned `result`): the outcome (handled, deferred, duplicate, retry, dead_letter, or ""
    when a stop cut it short), the kind of its dead letter, and why, in words. The one
    reading of the signals below `Settle`, for the record and the metrics alike."""
    if failure is None:
        return ("deferred" if isinstance(result, Later) else "handled"), "", ""
    if isinstance(failure, Duplicate):
        return "duplicate", "", ""
    if isinstance(failure, DeliveryError):  # bad input, a refusal, the last delivery (Exhausted)
        return "dead_letter", failure.kind, f"{failure.kind}: {failure.reason}"
    if isinstance(failure, HandlerFailed):
        last = w.delivery.attempt >= max_deliver
        return ("dead_letter" if last else "retry"), ("handler_error" if last else ""), failure.error
    if isinstance(failure, Exception):  # a direct delivery's handler: dead-lettered at once
        why = f"{w.handler_name} raised {type(failure).__name__}: {failure}"
        return "dead_letter", "handler_error", why
    return "", "", ""  # cancelled
