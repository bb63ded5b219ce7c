"""Traces, logs and taps: seeing what the mesh does."""
