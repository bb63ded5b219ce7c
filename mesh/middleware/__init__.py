"""The handler middleware chain."""
