"""Patterns built on the runtime: fan-out joins, approvals and the tool loop."""
