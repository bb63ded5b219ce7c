"""Benchmarks: the mesh at its defaults beside raw core NATS, raw JetStream and FastStream.

Run ``make bench`` (or ``mesh bench --quick``). Every agent, stage and driver is its own OS
process; every system does the same typed work on the same workloads, interleaved in the
same run. Results go to ``bench-results.json``; see docs/performance.md.
"""
