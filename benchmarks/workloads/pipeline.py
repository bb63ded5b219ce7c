"""W2 pipeline: events through stage A -> B -> C (each decodes, appends a marker, encodes and
hands off) and back to the driver. The mesh default hands off through JetStream inboxes;
the raw JetStream pipeline does the same by hand; raw core NATS and FastStream use core NATS.

The headline phase is driven like a user's code: one loop that sends event after event,
waiting for each send to return (for a durable send: for its publish ack), while the answers
come back on a subscription; events/s is events over the time from the first send to the
last answer. The 64-in-flight phase (64 lanes, each waiting for its event's answer before
sending the next) is an extra row, kept for comparison with earlier runs.
"""

from __future__ import annotations

from benchmarks.workloads import Mode, Phase, System, Target, Workload, latency, throughput

COUNTS = {"smoke": (10, 3, 10), "quick": (1000, 100, 600), "full": (3000, 300, 2000)}


def services(system: System) -> list[str]:
    if system.kind == "mesh":
        return ["stage_a", "stage_b", "stage_c"]
    prefix = "js-" if system.kind == "jetstream" else ""
    return [f"{prefix}stage-{s}" for s in "abc"]


def phases(mode: Mode) -> list[Phase]:
    sent, one, lanes = COUNTS[mode]
    return [
        Phase(
            "sent one after another",
            {"cmd": "stream", "n": sent},
            throughput(
                "W2 pipeline",
                "events/s",
                "event",
                Target("mesh", 1.5, "higher", "faststream"),
                Target("mesh", 0.35, "higher", "raw-js"),
                Target("mesh-direct", 0.4, "higher", "raw"),
                cpu=(Target("mesh", 1.0, "lower", "faststream"),),
            ),
        ),
        Phase("1 in flight", {"cmd": "serial", "n": one}, latency("W2 1 in flight", "event")),
        Phase(
            "64 in flight",
            {"cmd": "concurrent", "n": lanes, "inflight": 64},
            throughput("W2 64 in flight (extra)", "events/s", "event"),
        ),
    ]


WORKLOAD = Workload(
    "pipeline",
    "W2 pipeline (3 stages)",
    services,
    phases,
    systems=(
        "raw",
        "raw-js",
        "faststream",
        "mesh",
        "mesh-secure",
        "mesh-direct",
        "mesh-untraced",
        "mesh-sampled",
        "mesh-unrecorded",
    ),
    warmup=100,
)
