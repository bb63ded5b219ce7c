"""Benchmarks: mesh workloads measured beside the plain nats-py + msgspec floor.

Run ``make bench`` (or ``mesh bench --quick``). Every agent or stage is its own OS
process; the raw floor does the same work with plain nats-py processes, interleaved with
the mesh in the same run. Results go to ``bench-results.json``; see docs/performance.md.
"""
