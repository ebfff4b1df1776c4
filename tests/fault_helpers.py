"""Helpers for the fault, hostile-input and security tests: private servers started by a test.

The shared stack (deploy/local/stack) is never restarted by these tests. A test that restarts,
stops or reconfigures a server gets its own: a PostgreSQL+TimescaleDB cluster (`PrivateCluster`)
or a Mosquitto broker (`PrivateBroker`), on a free loopback port, in a folder under the system
temporary directory that the servers' own users can reach (pytest's tmp_path sits below a 0700
folder of the user running the tests; when that is root, PostgreSQL and Mosquitto run as the
unprivileged `postgres` and `mosquitto` users, like the local stack does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from benchmarks.harness import free_port
from ingest.db.migrate import migrate
from tests.conftest import Database
from tests.helpers import Ingester, Row, stored, wait_until

PG_ROLES = ("telemetry_owner", "ingest", "analyst")
TIMEOUT = 60.0


def new_site() -> str:
    """A site name no other test uses, so device paths (and readings) never collide."""
    return f"site-{uuid.uuid4().hex[:8]}"


def new_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}/telemetry"


def is_root() -> bool:
    return os.geteuid() == 0


def as_user(user: str, argv: Sequence[str]) -> list[str]:
    """`argv` run as the service user when the tests run as root (servers refuse root)."""
    return ["runuser", "-u", user, "--", *argv] if is_root() else list(argv)


def give_to(user: str, path: Path) -> None:
    """Make `path` (recursively) owned by `user` when running as root."""
    if not is_root():
        return
    entry = pwd.getpwnam(user)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


@contextlib.contextmanager
def service_dir() -> Iterator[Path]:
    """A fresh folder the `postgres` and `mosquitto` users can traverse; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="ingest-test-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def binary(name: str, *extra_dirs: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=":".join(extra_dirs))
    if found is None:
        pytest.fail(f"{name} is not installed: 'deploy/local/stack up' installs the test servers")
    return found


async def run(argv: Sequence[str], *, what: str) -> str:
    """Run a command to completion (bounded); fail the test with its output if it fails."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(TIMEOUT):
        out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        pytest.fail(f"{what} failed with exit status {proc.returncode}: {text}")
    return text


# ------------------------------------------------------------------------------ PostgreSQL


def pg_bin() -> Path:
    """The newest installed PostgreSQL server that has TimescaleDB (as deploy/local/stack)."""
    found = []
    for server in Path("/usr/lib/postgresql").glob("*/bin/postgres"):
        major = server.parent.parent.name
        if (Path(f"/usr/share/postgresql/{major}/extension/timescaledb.control")).exists():
            found.append((int(major), server.parent))
    if not found:
        pytest.fail(
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
        await run(
            as_user(
                "postgres",
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ],
            ),
            what="initdb",
        )
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
        except pytest.fail.Exception:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            pytest.fail(f"pg_ctl {' '.join(args)} failed; server log:\n{log}")

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
        conn = await asyncpg.connect(self.admin_dsn())
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
        finally:
            await conn.close()
        await migrate(dsn=self.url("telemetry_owner"))

    async def destroy(self) -> None:
        if self.data.exists() and await self.running():
            await run(
                as_user(
                    "postgres",
                    [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"],
                ),
                what="pg_ctl stop",
            )


@contextlib.asynccontextmanager
async def private_cluster() -> AsyncIterator[PrivateCluster]:
    with service_dir() as base:
        cluster = PrivateCluster(base)
        try:
            await cluster.create()
            yield cluster
        finally:
            await cluster.destroy()


class SlowCloseProxy:
    """A TCP proxy to PostgreSQL that passes bytes both ways at once, but a close only late.

    Like a load balancer or a pooler in front of the database: when the server ends a session
    on its own, its last message (a FATAL error) reaches the client at once and the close
    `hold_s` seconds later. A close the client asked for (a Terminate message) is not held.
    """

    _TERMINATE = b"X\x00\x00\x00\x04"  # the frontend's Terminate message

    def __init__(self, *, target_port: int, hold_s: float) -> None:
        self.target_port = target_port
        self.hold_s = hold_s
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SlowCloseProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        asked = asyncio.Event()  # the client sent Terminate or closed its side

        async def to_server() -> None:
            try:
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()
                    if data.endswith(self._TERMINATE):
                        asked.set()
            finally:
                asked.set()
                up_writer.close()

        async def to_client() -> None:
            try:
                while data := await up_reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                with contextlib.suppress(TimeoutError):  # the scenario: a slow close
                    await asyncio.wait_for(asked.wait(), timeout=self.hold_s)
            finally:
                writer.close()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)


# ------------------------------------------------------------------------------ Mosquitto


@dataclass(frozen=True)
class Certs:
    """A CA and a server certificate (for `localhost` and 127.0.0.1) signed by it, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    proc = subprocess.run(
        [binary("openssl"), *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    if proc.returncode != 0:
        pytest.fail(f"openssl {args[0]} failed: {proc.stderr}")


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA certificate and its key."""
    ca, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(ca), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return ca, key


def make_certs(directory: Path) -> Certs:
    """A test CA, and a server certificate signed by it for `localhost` and 127.0.0.1."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca(directory, "ingest-test-ca")
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return Certs(ca=ca, cert=cert, key=key)


class PrivateBroker:
    """A Mosquitto broker of one test, on its own port, config and persistence folder.

    Logs go to a file (a pipe nobody reads would fill up and stall the broker). As root the
    broker drops to the `mosquitto` user, so its folder is given to that user.
    """

    def __init__(
        self,
        base: Path,
        *,
        persistence: bool = False,
        certs: Certs | None = None,
        users: dict[str, str] | None = None,
    ) -> None:
        self.dir = base / f"mqtt-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        self.port = free_port()
        self.certs = certs
        self.logfile = self.dir / "mosquitto.log"
        self.conf = self.dir / "mosquitto.conf"
        self.proc: asyncio.subprocess.Process | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"log_dest file {self.logfile}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_packet_size 8388608",
            "max_inflight_messages 0",
            "max_queued_messages 10000000",
            "max_queued_bytes 0",
        ]
        if persistence:
            # Saved on a clean shutdown (SIGTERM), and every second while running.
            lines += [
                "persistence true",
                f"persistence_location {self.dir}/",
                "autosave_interval 1",
            ]
        if certs is not None:
            lines += [f"cafile {certs.ca}", f"certfile {certs.cert}", f"keyfile {certs.key}"]
        if users is not None:
            passwd = self.dir / "passwd"
            tool = binary("mosquitto_passwd", "/usr/bin", "/usr/sbin")
            for n, (user, password) in enumerate(users.items()):
                create = ["-c"] if n == 0 else []
                subprocess.run(
                    [tool, "-b", *create, str(passwd), user, password],
                    check=True,
                    capture_output=True,
                    timeout=TIMEOUT,
                )
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")

    def url(self, *, user: str | None = None, password: str | None = None) -> str:
        scheme = "mqtts" if self.certs is not None else "mqtt"
        host = "localhost" if self.certs is not None else "127.0.0.1"
        auth = f"{user}:{password}@" if user is not None else ""
        return f"{scheme}://{auth}{host}:{self.port}"

    async def start(self) -> None:
        if self.certs is not None:
            give_to("mosquitto", self.certs.ca.parent)
        give_to("mosquitto", self.dir)
        self.proc = await asyncio.create_subprocess_exec(
            binary("mosquitto", "/usr/sbin", "/usr/local/sbin"),
            "-c",
            str(self.conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )

        async def listening() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                pytest.fail(f"mosquitto exited with {self.proc.returncode}: {self.log()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            writer.close()
            return True

        await wait_until(listening, timeout=TIMEOUT, every=0.05)

    async def stop(self) -> None:
        """SIGTERM: a clean shutdown, which writes the persistence file."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(TIMEOUT):
                await self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""


def publish_sync(
    url: str,
    messages: Iterable[tuple[str, bytes, str | None]],
    *,
    ca_file: Path | None = None,
    client_id: str | None = None,
) -> None:
    """Publish (topic, payload, content type) at QoS 1 and return once the broker acked all."""
    parts = urlsplit(url)
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"pub-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5,
        reconnect_on_failure=False,
    )
    client.max_inflight_messages_set(200)
    client.max_queued_messages_set(0)
    if parts.username:
        client.username_pw_set(unquote(parts.username), unquote(parts.password or ""))
    if parts.scheme == "mqtts":
        client.tls_set(ca_certs=str(ca_file) if ca_file else None)
    connected = threading.Event()
    client.on_connect = lambda *args: connected.set()
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
    client.loop_start()
    try:
        assert connected.wait(TIMEOUT), "the publisher got no CONNACK"
        infos = []
        for topic, payload, content_type in messages:
            props = None
            if content_type is not None:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.ContentType = content_type
            info = client.publish(topic, payload, qos=1, properties=props)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish to {topic[:80]!r}: rc {info.rc}"
            infos.append(info)
        for info in infos:
            info.wait_for_publish(timeout=TIMEOUT)
            assert info.is_published(), "the broker did not acknowledge a publish in time"
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(
    url: str,
    messages: Iterable[tuple[str, bytes, str | None]],
    *,
    ca_file: Path | None = None,
) -> None:
    """`publish_sync` in a thread, so the event loop keeps polling metrics meanwhile."""
    await asyncio.to_thread(publish_sync, url, list(messages), ca_file=ca_file)


def purge_session(url: str, client_id: str) -> None:
    """End the broker-side session of an ingester (clean start, session expiry 0)."""
    parts = urlsplit(url)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    done = threading.Event()
    client.on_connect = lambda *args: done.set()
    client.connect(parts.hostname or "127.0.0.1", parts.port or 1883, clean_start=True)
    client.loop_start()
    try:
        assert done.wait(TIMEOUT), f"no CONNACK for {client_id}"
    finally:
        client.disconnect()
        client.loop_stop()


# ------------------------------------------------------------------------------ the ingester


# ------------------------------------------------------------------------------ data


async def stored_count(db: Database, site: str) -> int:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM telemetry.readings_v WHERE device LIKE $1 || '/%'", site
        )
    finally:
        await conn.close()
    return count


async def assert_exactly_once(
    db: Database, site: str, expected: set[Row], *, running: Sequence[Ingester] = ()
) -> None:
    """Wait until the site holds as many readings as expected, then compare them all.

    Fails at once, with its log, if one of the `running` ingesters exits meanwhile.
    """

    async def all_there() -> bool:
        for service in running:
            assert service.alive, f"ingest run exited: {service.log.decode()}"
        return await stored_count(db, site) >= len(expected)

    await wait_until(all_there, timeout=120)
    rows = await stored(db, site)
    assert len(rows) == len(expected), "a reading was stored twice"
    missing = expected - set(rows)
    extra = set(rows) - expected
    problems = (
        f"{len(missing)} readings missing (e.g. {sorted(missing)[:3]}), "
        f"{len(extra)} unexpected (e.g. {sorted(extra)[:3]})"
    )
    assert not missing, problems
    assert not extra, problems


@dataclass(frozen=True)
class DeadLetterRow:
    topic: str
    payload_md5: str
    payload_len: int
    reason: str
    content_type: str | None


async def dead_letters(db: Database, prefix: str) -> list[DeadLetterRow]:
    conn = await asyncpg.connect(db.analyst_url)
    try:
        rows = await conn.fetch(
            "SELECT topic, md5(payload) AS md5, length(payload) AS len, reason, content_type"
            "  FROM telemetry.dead_letters WHERE starts_with(topic, $1 || '/')",
            prefix,
        )
    finally:
        await conn.close()
    return [
        DeadLetterRow(r["topic"], r["md5"], r["len"], r["reason"], r["content_type"]) for r in rows
    ]


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@contextlib.asynccontextmanager
async def table_lock(db: Database, *tables: str) -> AsyncIterator[asyncpg.Connection]:
    """Hold ACCESS EXCLUSIVE locks on `tables` in an owner transaction until the block ends."""
    conn = await asyncpg.connect(db.owner_url)
    try:
        await conn.execute("SET lock_timeout = '30s'")  # taking the lock is bounded too
        tx = conn.transaction()
        await tx.start()
        try:
            for table in tables:
                await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield conn
        finally:
            await tx.rollback()
    finally:
        await conn.close()


async def ingest_waits_for_lock(conn: asyncpg.Connection) -> bool:
    """Whether a session of the `ingest` role is blocked on a lock (seen from the lock holder)."""
    waiting: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
        " WHERE NOT l.granted AND a.usename = 'ingest' AND l.database = ("
        "SELECT oid FROM pg_database WHERE datname = current_database()))"
    )
    return waiting
