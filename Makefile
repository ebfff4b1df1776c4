# make run: bring the local stack up and run the service (Ctrl-C stops it).
# make test: the same set-up, then lint, type-check and the whole test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STACK := deploy/local/stack
WITH_STACK_ENV = set -a; eval "$$($(STACK) env)"; set +a;

.PHONY: run test lint bench bench-e2e stack-up stack-down stack-status clean

$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  if [ "$$(id -u)" -eq 0 ]; then apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; \
	  else echo "make: Python's venv is missing; run: sudo apt-get install -y python3-venv" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

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

bench: $(VENV)/.installed stack-up
	@$(WITH_STACK_ENV) $(BIN)/pytest benchmarks --benchmark-enable -p no:cacheprovider

clean: stack-down
	rm -rf $(VENV) .stack
