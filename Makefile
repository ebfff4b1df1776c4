# make run: bring the local stack up and run the service (Ctrl-C stops it).
# make test: the same set-up, then lint, type-check and the whole test suite.
# make deps-upgrade: take the newest releases pyproject.toml allows into requirements.lock, then
# rebuild the venv from it and run the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
RUNTIME_LOCK := requirements-runtime.lock
STACK := deploy/local/stack
WITH_STACK_ENV = set -a; eval "$$($(STACK) env)"; set +a;

.PHONY: run test lint bench bench-e2e bench-quality stack-up stack-down stack-status clean deps-lock deps-upgrade

$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ]; then apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; \
	  else echo "make: Python's venv is missing; run: sudo apt-get install -y python3-venv" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)

# Exact versions with their hashes from the lock, then the package itself without resolving
# anything (its build backend, setuptools, is in the lock too).
$(VENV)/.installed: $(BIN)/python $(LOCK) pyproject.toml
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# The locks are universal: one file for every supported Python and platform, made by uv, which
# resolves for all of them at once. Without --upgrade, uv keeps the pins already in the file and
# moves only what pyproject.toml no longer allows. The runtime lock (the container image's) is
# the service's own closure, constrained to the versions of the full lock.
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --quiet --custom-compile-command 'make deps-lock'
LOCK_COMPILE = $(UV_COMPILE) --extra test --extra build --extra dev -o $(LOCK)
RUNTIME_LOCK_COMPILE = $(UV_COMPILE) --extra build -c $(LOCK) -o $(RUNTIME_LOCK)

deps-lock: $(VENV)/.installed
	$(LOCK_COMPILE)
	$(RUNTIME_LOCK_COMPILE)

deps-upgrade: $(VENV)/.installed
	cp $(LOCK) $(VENV)/lock.before
	$(LOCK_COMPILE) --upgrade
	$(RUNTIME_LOCK_COMPILE)
	@diff <(grep -E '^[A-Za-z0-9]' $(VENV)/lock.before) <(grep -E '^[A-Za-z0-9]' $(LOCK)) \
	  | sed -nE 's/^< /was: /p; s/^> /now: /p' || true
	rm -rf $(VENV)
	$(MAKE) test

stack-up:
	$(STACK) up

stack-down:
	$(STACK) down

stack-status:
	$(STACK) status

run: $(VENV)/.installed stack-up
	@$(WITH_STACK_ENV) export PATH="$(CURDIR)/$(BIN):$$PATH"; ingest migrate && deploy/local/demo

bench-e2e: $(VENV)/.installed stack-up
	@$(WITH_STACK_ENV) $(BIN)/python -m benchmarks.e2e

lint: $(VENV)/.installed
	$(BIN)/ruff check ingest tests benchmarks
	$(BIN)/ruff format --check ingest tests benchmarks
	$(BIN)/mypy

test: $(VENV)/.installed stack-up lint
	@$(WITH_STACK_ENV) $(BIN)/pytest

bench-quality: $(VENV)/.installed
	$(BIN)/python -m benchmarks.anomaly_quality --per-file

bench: $(VENV)/.installed stack-up
	@$(WITH_STACK_ENV) $(BIN)/pytest benchmarks --benchmark-enable --benchmark-timer time.process_time -p no:cacheprovider

clean: stack-down
	rm -rf $(VENV) .stack
