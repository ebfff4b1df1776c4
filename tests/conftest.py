"""Fixtures: the real PostgreSQL+TimescaleDB and Mosquitto that `make test` starts.

What they are built from lives in tests/support/, which the benchmarks use too.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from tests.support import SupportError
from tests.support.alerts import Receiver
from tests.support.cluster import Database, create_database, drop_database
from tests.support.ingester import warm_up_kernels
from tests.support.stack import stack_env


@pytest.fixture(scope="session")
def stack() -> dict[str, str]:
    """The local stack's addresses; a test that needs them fails with one line without them."""
    try:
        return stack_env()
    except SupportError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Fill numba's on-disk cache once, before any test starts an ingester: on a fresh checkout
    the first `ingest run` would otherwise compile every kernel while its start is timed."""
    warm_up_kernels()


@pytest.fixture(scope="session")
def mqtt_url(stack: dict[str, str]) -> str:
    return stack["INGEST_MQTT_URL"]


@pytest.fixture(scope="session")
async def database(stack: dict[str, str]) -> AsyncIterator[Database]:
    """A migrated scratch database shared by the session's end-to-end tests."""
    db = await create_database(migrated=True)
    yield db
    await drop_database(db)


@pytest.fixture
async def empty_database(stack: dict[str, str]) -> AsyncIterator[Database]:
    """A scratch database with TimescaleDB and nothing else, for migration tests."""
    db = await create_database(migrated=False)
    yield db
    await drop_database(db)


@pytest.fixture
async def db(stack: dict[str, str]) -> AsyncIterator[Database]:
    """A migrated scratch database of the test's own, shared with no other test."""
    db = await create_database(migrated=True)
    yield db
    await drop_database(db)


@pytest.fixture
async def owner_conn(db: Database) -> AsyncIterator[asyncpg.Connection]:
    """The schema owner's connection to `db`."""
    conn = await asyncpg.connect(db.owner_url)
    yield conn
    await conn.close()


@pytest.fixture
async def service(db: Database) -> AsyncIterator[asyncpg.Connection]:
    """The service's connection to `db`, as the insert-only `ingest` role."""
    conn = await asyncpg.connect(db.ingest_url)
    yield conn
    await conn.close()


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    """A real HTTP receiver process that records every request (tests/support/alert_receiver)."""
    r = await Receiver(tmp_path / "requests.jsonl").start()
    yield r
    await r.stop()


@pytest.fixture
async def owner(database: Database) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database.owner_url)
    yield conn
    await conn.close()


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses, so tests can share the broker and the database."""
    return f"t{uuid.uuid4().hex[:10]}/telemetry"
