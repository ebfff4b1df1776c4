"""The local stack the tests and benchmarks run against: its addresses, from the environment."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support import SupportError

ROOT = Path(__file__).resolve().parent.parent.parent

STACK_VARS = (
    "INGEST_DB_URL",
    "INGEST_MIGRATE_DB_URL",
    "INGEST_MQTT_URL",
    "STACK_ANALYST_DB_URL",
    "STACK_PG_SOCKET_DIR",
    "STACK_PG_PORT",
)


def stack_var(name: str) -> str:
    """One of the addresses `deploy/local/stack env` exports."""
    value = os.environ.get(name)
    if not value:
        raise SupportError(
            f"{name} is not set: run the tests with 'make test', or start the local stack and "
            "export its addresses ('deploy/local/stack up; set -a; eval \"$(deploy/local/stack "
            "env)\"; set +a')"
        )
    return value


def stack_env() -> dict[str, str]:
    """Every address of the stack; fails on the first one missing."""
    return {name: stack_var(name) for name in STACK_VARS}
