"""Fixtures: the real PostgreSQL+TimescaleDB and Mosquitto that `make test` starts."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ingest.db.migrate import migrate
from tests.alert_helpers import Receiver

ROOT = Path(__file__).resolve().parent.parent


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: run the tests with 'make test', which starts the local stack "
            "and exports its addresses",
            pytrace=False,
        )
    return value


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def admin_dsn(database: str = "postgres") -> str:
    """The stack's superuser over its private Unix socket (test set-up only)."""
    return f"postgresql://postgres@/{database}?host={_env('STACK_PG_SOCKET_DIR')}&port={_env('STACK_PG_PORT')}"


@dataclass(frozen=True)
class Database:
    """One scratch database of the stack, with the owner's, the service's and the analysts' URLs."""

    name: str
    owner_url: str
    ingest_url: str
    analyst_url: str


async def create_database(*, migrated: bool) -> Database:
    name = f"test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(admin_dsn())
    try:
        await conn.execute(f'CREATE DATABASE "{name}" OWNER telemetry_owner')
    finally:
        await conn.close()
    conn = await asyncpg.connect(admin_dsn(name))
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    finally:
        await conn.close()
    db = Database(
        name=name,
        owner_url=with_database(_env("INGEST_MIGRATE_DB_URL"), name),
        ingest_url=with_database(_env("INGEST_DB_URL"), name),
        analyst_url=with_database(_env("STACK_ANALYST_DB_URL"), name),
    )
    if migrated:
        await migrate(dsn=db.owner_url)
    return db


async def drop_database(db: Database) -> None:
    conn = await asyncpg.connect(admin_dsn())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Fill numba's on-disk cache once, before any test starts an ingester: on a fresh checkout
    the first `ingest run` would otherwise compile every kernel while its start is timed."""
    subprocess.run(
        [sys.executable, "-c", "from ingest.warmup import warm_up; warm_up()"],
        check=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def mqtt_url() -> str:
    return _env("INGEST_MQTT_URL")


@pytest.fixture(scope="session")
async def database() -> AsyncIterator[Database]:
    """A migrated scratch database shared by the session's end-to-end tests."""
    db = await create_database(migrated=True)
    yield db
    await drop_database(db)


@pytest.fixture
async def empty_database() -> AsyncIterator[Database]:
    """A scratch database with TimescaleDB and nothing else, for migration tests."""
    db = await create_database(migrated=False)
    yield db
    await drop_database(db)


@pytest.fixture
async def db() -> AsyncIterator[Database]:
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
    """A real HTTP receiver process that records every request (tests/alert_receiver.py)."""
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
