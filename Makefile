PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install demo test lint bench clean browser

# Create .venv and install the project with its dev tools; re-runs when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mesh demo

# The web view's browser test (tests/test_webview.py) drives the system's Chromium through
# Playwright, never a downloaded browser: install Debian's when it is missing (CI runs as root).
browser:
	command -v chromium >/dev/null || (apt-get install -y -q chromium || (apt-get update -q && apt-get install -y -q chromium))

# Two workers (each with its own nats-server) keep the suite under 10 minutes on 2 cores;
# the heaviest fault tests share one worker (xdist_group "heavy"), so they never overlap.
TEST_WORKERS ?= 2

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# FastStream and the profilers are bench-only: `make test` never installs them.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# The workloads of docs/performance.md on the mesh beside raw core NATS, raw JetStream and
# FastStream; prints the tables and writes bench-results.json.
# BENCH_ARGS=--quick for a shorter run (one round, smaller counts).
bench: $(BENCH_STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
