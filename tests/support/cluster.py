"""The database: scratch databases in the stack's cluster, and private clusters of one test.

A scratch database belongs to telemetry_owner and has TimescaleDB (and, unless asked
otherwise, the migrations); the stack's three roles reach it with their own URLs. A test that
restarts, stops or reconfigures PostgreSQL gets a `PrivateCluster` of its own instead, on a
free port, provisioned like deploy/local/stack does: the shared stack is never restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ingest.db.migrate import migrate
from tests.support import SupportError
from tests.support.net import free_port
from tests.support.process import TIMEOUT, as_user, give_to, run, service_dir
from tests.support.stack import stack_var

PG_ROLES = ("telemetry_owner", "ingest", "analyst")


@dataclass(frozen=True)
class Database:
    """One database, with the owner's, the service's and the analysts' URLs."""

    name: str
    owner_url: str
    ingest_url: str
    analyst_url: str


def with_database(url: str, database: str) -> str:
    """`url` with its database replaced."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def admin_dsn(database: str = "postgres") -> str:
    """The stack's superuser over its private Unix socket (set-up and checks only)."""
    return (
        f"postgresql://postgres@/{database}"
        f"?host={stack_var('STACK_PG_SOCKET_DIR')}&port={stack_var('STACK_PG_PORT')}"
    )


async def execute(url: str, sql: str) -> None:
    """Run `sql` (one or more statements) on a connection of its own."""
    conn = await asyncpg.connect(url, timeout=30)
    try:
        await conn.execute(sql, timeout=300)
    finally:
        await conn.close()


async def create_database(*, migrated: bool, prefix: str = "test") -> Database:
    """A new database in the stack's cluster, named `<prefix>_<random>`."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await execute(admin_dsn(), f'CREATE DATABASE "{name}" OWNER telemetry_owner')
    await execute(admin_dsn(name), "CREATE EXTENSION IF NOT EXISTS timescaledb")
    db = Database(
        name=name,
        owner_url=with_database(stack_var("INGEST_MIGRATE_DB_URL"), name),
        ingest_url=with_database(stack_var("INGEST_DB_URL"), name),
        analyst_url=with_database(stack_var("STACK_ANALYST_DB_URL"), name),
    )
    if migrated:
        await migrate(dsn=db.owner_url)
    return db


async def drop_database(db: Database) -> None:
    await execute(admin_dsn(), f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def scratch_database(
    *, migrated: bool = True, prefix: str = "test", keep: bool = False
) -> AsyncIterator[Database]:
    """`create_database`, dropped when the block ends unless `keep`."""
    db = await create_database(migrated=migrated, prefix=prefix)
    try:
        yield db
    finally:
        if not keep:
            await drop_database(db)


# ------------------------------------------------------------------------------ private clusters


def pg_bin() -> Path:
    """The newest installed PostgreSQL server that has TimescaleDB (as deploy/local/stack)."""
    found = []
    for server in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        major = server.parent.parent.name
        if (Path(f"/usr/share/postgresql/{major}/extension/timescaledb.control")).exists():
            found.append((int(major), server.parent))
    if not found:
        raise SupportError(
            "no PostgreSQL server with TimescaleDB under /usr/lib/postgresql: "
            "'deploy/local/stack up' installs them"
        )
    return max(found)[1]


class PrivateCluster:
    """A throwaway PostgreSQL+TimescaleDB cluster: scram-sha-256 for every TCP connection.

    Provisioned like deploy/local/stack's pg_provision: roles telemetry_owner (the schema
    owner), ingest and analyst with generated passwords, database `telemetry` owned by
    telemetry_owner with the timescaledb extension, then the migrations as the owner.
    """

    def __init__(self, base: Path) -> None:
        self.bin = pg_bin()
        self.dir = base / "pg"
        self.data = self.dir / "data"
        self.sockets = self.dir / "run"
        self.logfile = self.dir / "server.log"
        self.port = free_port()
        self.passwords = {role: secrets.token_urlsafe(18) for role in PG_ROLES}

    def url(self, role: str, *, password: str | None = None, database: str = "telemetry") -> str:
        secret = self.passwords[role] if password is None else password
        return f"postgresql://{role}:{secret}@127.0.0.1:{self.port}/{database}"

    def admin_dsn(self, database: str = "telemetry") -> str:
        """The cluster's superuser over its private Unix socket (set-up and checks only)."""
        return f"postgresql://postgres@/{database}?host={self.sockets}&port={self.port}"

    def as_database(self) -> Database:
        return Database(
            name="telemetry",
            owner_url=self.url("telemetry_owner"),
            ingest_url=self.url("ingest"),
            analyst_url=self.url("analyst"),
        )

    async def create(self) -> None:
        self.sockets.mkdir(parents=True)
        give_to("postgres", self.dir)
        initdb = [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres"]
        initdb += ["--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8"]
        initdb += ["--locale=C.UTF-8", "--no-sync"]
        await run(as_user("postgres", initdb), what="initdb")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# ingest fault tests\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.sockets}'\n"
                "shared_preload_libraries = 'timescaledb'\n"
                "timescaledb.telemetry_level = off\n"
                "password_encryption = 'scram-sha-256'\n"
                "fsync = off\n"  # throwaway data: no need to survive a power cut
                "max_connections = 50\n"
                "log_min_messages = warning\n"
            )
        await self.start()
        await self._provision()

    async def _pg_ctl(self, *args: str) -> None:
        argv = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile)]
        try:
            await run(as_user("postgres", [*argv, "-w", "-t", "60", *args]), what="pg_ctl")
        except SupportError:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise SupportError(f"pg_ctl {' '.join(args)} failed; server log:\n{log}") from None

    async def start(self) -> None:
        await self._pg_ctl("start")

    async def stop(self) -> None:
        await self._pg_ctl("-m", "fast", "stop")

    async def restart(self) -> None:
        """A fast restart: active sessions are terminated, open transactions rolled back."""
        await self._pg_ctl("-m", "fast", "restart")

    async def running(self) -> bool:
        proc = await asyncio.create_subprocess_exec(
            *as_user("postgres", [str(self.bin / "pg_ctl"), "-D", str(self.data), "status"]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(TIMEOUT):
            return await proc.wait() == 0

    async def ensure_running(self) -> None:
        if not await self.running():
            await self.start()

    async def _provision(self) -> None:
        conn = await asyncpg.connect(self.admin_dsn("postgres"))
        try:
            for role in PG_ROLES:
                # DDL takes no parameters: quote on the server with format(%I, %L).
                statement = await conn.fetchval(
                    "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
                    role,
                    self.passwords[role],
                )
                await conn.execute(statement)
            await conn.execute("ALTER ROLE telemetry_owner CREATEROLE")
            await conn.execute("CREATE DATABASE telemetry OWNER telemetry_owner")
        finally:
            await conn.close()
        await execute(self.admin_dsn(), "CREATE EXTENSION IF NOT EXISTS timescaledb")
        await migrate(dsn=self.url("telemetry_owner"))

    async def destroy(self) -> None:
        if self.data.exists() and await self.running():
            stop = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]
            await run(as_user("postgres", stop), what="pg_ctl stop")


@contextlib.asynccontextmanager
async def private_cluster() -> AsyncIterator[PrivateCluster]:
    with service_dir() as base:
        cluster = PrivateCluster(base)
        try:
            await cluster.create()
            yield cluster
        finally:
            await cluster.destroy()
