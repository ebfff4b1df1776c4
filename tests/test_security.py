"""Security: MQTT over TLS with passwords, scram-sha-256 for PostgreSQL, least privilege, no SQL
text built from payload content.

The TLS broker and the scram cluster are private to this module (tests/support/): a CA
and a server certificate made by the test with the openssl command, a Mosquitto listener that
requires TLS and a password, and a PostgreSQL+TimescaleDB cluster whose TCP connections all
authenticate with scram-sha-256.
"""

from __future__ import annotations

import ast
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tests.support.broker import PrivateBroker
from tests.support.certs import Certs, make_ca, make_certs, make_client_cert
from tests.support.cluster import PG_ROLES, PrivateCluster, admin_dsn, private_cluster
from tests.support.ingester import Ingester, ingest_cli, ingester_env
from tests.support.mqtt import publish
from tests.support.net import http_get
from tests.support.process import service_dir, wait_until
from tests.support.rows import assert_exactly_once, stored
from tests.support.stack import ROOT
from tests.support.streams import new_prefix, new_site, recorded, stream

# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
async def cluster() -> AsyncIterator[PrivateCluster]:
    """A private cluster with roles, passwords (scram) and the migrated schema."""
    async with private_cluster() as private:
        await _seed(private)
        yield private


async def _seed(cluster: PrivateCluster) -> None:
    """What a running ingester would have written, and things outside its tables."""
    conn = await asyncpg.connect(cluster.url("ingest"))
    try:  # the ingest role's own work succeeds
        device = await conn.fetchval(
            "INSERT INTO telemetry.devices (path, name) VALUES ('sec/dev', 'dev') RETURNING id"
        )
        sensor = await conn.fetchval(
            "INSERT INTO telemetry.sensors (device_id, name) VALUES ($1, 't') RETURNING id", device
        )
        await conn.execute(
            "INSERT INTO telemetry.readings (time, sensor_id, value) VALUES (now(), $1, 1.5)",
            sensor,
        )
        await conn.execute("UPDATE telemetry.sensors SET unit = 'degC' WHERE id = $1", sensor)
        await conn.execute("CREATE TEMPORARY TABLE staging (a int)")
    finally:
        await conn.close()
    conn = await asyncpg.connect(cluster.url("telemetry_owner"))
    try:
        await conn.execute(
            "CREATE SCHEMA elsewhere; CREATE TABLE elsewhere.secrets (a int);"
            " CREATE TABLE public.secrets (a int); INSERT INTO public.secrets VALUES (42)"
        )
    finally:
        await conn.close()


@dataclass(frozen=True)
class TlsBroker:
    broker: PrivateBroker
    certs: Certs
    other_ca: Path
    passwords: dict[str, str]

    def url(self, user: str, password: str | None = None) -> str:
        secret = self.passwords[user] if password is None else password
        return self.broker.url(user=user, password=secret)


@pytest.fixture(scope="module")
async def tls_broker() -> AsyncIterator[TlsBroker]:
    """Mosquitto with only a TLS listener and password authentication (no anonymous access)."""
    passwords = {"ingest": "in-gest-secret-1", "device": "dev-ice-secret-2"}
    with service_dir() as base:
        certs = make_certs(base / "pki")
        other_ca, _ = make_ca(base / "pki", "untrusted-ca")
        broker = PrivateBroker(base, certs=certs, users=passwords)
        await broker.start()
        try:
            yield TlsBroker(broker, certs, other_ca, passwords)
        finally:
            await broker.stop()


# ------------------------------------------------------------------------------ MQTT over TLS


async def test_tls_with_passwords_end_to_end(
    tls_broker: TlsBroker, cluster: PrivateCluster
) -> None:
    site, prefix = new_site(), new_prefix()
    messages, expected = stream(site, devices=2, messages=20, per_message=50)
    env = ingester_env(
        cluster.as_database(),
        tls_broker.url("ingest"),
        prefix,
        INGEST_MQTT_TLS_CA_FILE=str(tls_broker.certs.ca),
    )
    ingester = await Ingester(env).start()
    try:
        await publish(
            tls_broker.url("device"),
            [(f"{prefix}/{device}", payload, None) for device, payload in messages],
            ca_file=tls_broker.certs.ca,
        )
        await assert_exactly_once(cluster.as_database(), site, expected, running=[ingester])
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()
    log = ingester.log.decode()
    assert f"MQTT connected to mqtts://ingest:***@localhost:{tls_broker.broker.port}" in log
    for secret in (tls_broker.passwords["ingest"], cluster.passwords["ingest"]):
        assert secret not in log


@dataclass
class MtlsBroker:
    broker: PrivateBroker
    certs: Certs
    clients: dict[str, tuple[Path, Path]]  # user -> (certificate, key)
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return self.broker.url(user=user, password=self.passwords[user])


@pytest.fixture(scope="module")
async def mtls_broker() -> AsyncIterator[MtlsBroker]:
    """Mosquitto whose TLS listener asks every client for a certificate signed by its CA, and a
    password too."""
    passwords = {"ingest": "in-gest-secret-3", "device": "dev-ice-secret-4"}
    with service_dir() as base:
        certs = make_certs(base / "pki")
        clients = {user: make_client_cert(certs, base / "pki", user) for user in passwords}
        broker = PrivateBroker(base, certs=certs, users=passwords, require_certificate=True)
        await broker.start()
        try:
            yield MtlsBroker(broker, certs, clients, passwords)
        finally:
            await broker.stop()


async def test_client_certificates_end_to_end(
    mtls_broker: MtlsBroker, cluster: PrivateCluster, tmp_path: Path
) -> None:
    """`ingest run` and `ingest simulate` each show a client certificate, from their settings."""
    site, prefix = new_site(), new_prefix()
    cert, key = mtls_broker.clients["ingest"]
    env = ingester_env(
        cluster.as_database(),
        mtls_broker.url("ingest"),
        prefix,
        INGEST_MQTT_TLS_CA_FILE=str(mtls_broker.certs.ca),
        INGEST_MQTT_TLS_CERT_FILE=str(cert),
        INGEST_MQTT_TLS_KEY_FILE=str(key),
    )
    ingester = await Ingester(env).start()
    try:
        plant = tmp_path / "plant.toml"
        plant.write_text(f'[[line]]\npath = "{site}/line1"\ndevices = ["press-01"]\n')
        dev_cert, dev_key = mtls_broker.clients["device"]
        code, _, err = await ingest_cli(
            *("simulate", "--url", mtls_broker.url("device"), "--prefix", prefix, "--quiet"),
            *("--plant", str(plant), "--batch", "10", "--duration", "3"),
            *("--start", "2026-01-01T00:00:00Z", "--record", str(tmp_path / "load")),
            *("--ca-file", str(mtls_broker.certs.ca)),
            *("--cert-file", str(dev_cert), "--key-file", str(dev_key)),
        )
        assert code == 0, err
        expected = recorded(str(tmp_path / "load.*"), prefix)
        assert len(expected) == 6 * 30
        await assert_exactly_once(cluster.as_database(), site, expected, running=[ingester])
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()
    assert "ingest" in mtls_broker.broker.log()


async def test_simulate_without_the_certificate_a_broker_asks_for_is_one_line(
    mtls_broker: MtlsBroker,
) -> None:
    code, out, err = await ingest_cli(
        *("simulate", "--url", mtls_broker.url("device"), "--prefix", new_prefix()),
        *("--ca-file", str(mtls_broker.certs.ca), "--duration", "1", "--quiet"),
    )
    assert code != 0
    assert out == ""
    assert len(err.splitlines()) == 1, err
    at = f"localhost:{mtls_broker.broker.port}"
    # Refused in the handshake or right after it, depending on the TLS version.
    assert err.startswith(
        (
            f"ingest: the connection to the broker at {at} failed: ",
            f"ingest: cannot connect to the broker at {at}: ",
        )
    ), err
    hint = "; if the broker asks for a client certificate, give one with --cert-file\n"
    assert err.endswith(hint), err


async def test_simulate_key_without_certificate_names_the_option(tmp_path: Path) -> None:
    code, _, err = await ingest_cli(
        *("simulate", "--url", "mqtts://localhost:1", "--prefix", new_prefix()),
        *("--key-file", str(tmp_path / "client.key"), "--duration", "1", "--quiet"),
    )
    assert code != 0
    assert err == "ingest: config: --key-file: set without --cert-file\n", err


async def test_wrong_mqtt_password_stops_with_one_line_naming_mqtt_url(
    tls_broker: TlsBroker, cluster: PrivateCluster
) -> None:
    env = ingester_env(
        cluster.as_database(),
        tls_broker.url("ingest", "not-the-password"),
        new_prefix(),
        INGEST_MQTT_TLS_CA_FILE=str(tls_broker.certs.ca),
    )
    ingester = await Ingester(env).spawn()
    code = await ingester.wait_exit()
    log = ingester.log.decode()
    assert code != 0, log
    lines = [line for line in log.splitlines() if "mqtt.url" in line]
    assert len(lines) == 1, log
    assert " ERROR " in lines[0]
    assert (
        f"mqtt.url: mqtts://ingest:***@localhost:{tls_broker.broker.port} refused the connection: "
        in lines[0]
    )
    assert "Traceback" not in log
    assert "not-the-password" not in log


async def test_simulate_publishes_over_tls_with_a_password(
    tls_broker: TlsBroker, cluster: PrivateCluster, tmp_path: Path
) -> None:
    """`ingest simulate` (its own MQTT client) over TLS, verifying the broker with --ca-file."""
    site, prefix = new_site(), new_prefix()
    env = ingester_env(
        cluster.as_database(),
        tls_broker.url("ingest"),
        prefix,
        INGEST_MQTT_TLS_CA_FILE=str(tls_broker.certs.ca),
    )
    ingester = await Ingester(env).start()
    try:
        plant = tmp_path / "plant.toml"
        plant.write_text(f'[[line]]\npath = "{site}/line1"\ndevices = ["press-01", "press-02"]\n')
        code, _, err = await ingest_cli(
            *("simulate", "--url", tls_broker.url("device"), "--prefix", prefix, "--quiet"),
            *("--plant", str(plant), "--batch", "10", "--duration", "3"),
            *("--start", "2026-01-01T00:00:00Z", "--record", str(tmp_path / "load")),
            *("--ca-file", str(tls_broker.certs.ca)),
        )
        assert code == 0, err
        expected = recorded(str(tmp_path / "load.*"), prefix)
        assert len(expected) == 2 * 6 * 30

        async def all_stored() -> bool:
            return len(await stored(cluster.as_database(), site)) >= len(expected)

        await wait_until(all_stored, timeout=60)
        assert set(await stored(cluster.as_database(), site)) == expected
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()


@pytest.mark.parametrize(
    ("password", "ca", "line"),
    [
        ("not-the-password", "ca", "the broker at {at} refused the connection: not authorized"),
        (None, "other", "cannot connect to the broker at {at}: [SSL: CERTIFICATE_VERIFY_FAILED]"),
    ],
    ids=["password", "certificate"],
)
async def test_simulate_refused_or_untrusted_is_one_line(
    tls_broker: TlsBroker, password: str | None, ca: str, line: str
) -> None:
    # The CA from the environment: INGEST_MQTT_TLS_CA_FILE, as the ingester reads it.
    ca_file = tls_broker.certs.ca if ca == "ca" else tls_broker.other_ca
    code, out, err = await ingest_cli(
        *("simulate", "--url", tls_broker.url("device", password), "--prefix", new_prefix()),
        *("--devices", "1", "--duration", "1"),
        env={"INGEST_MQTT_TLS_CA_FILE": str(ca_file)},
    )
    assert (code, out) == (1, ""), err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ingest: " + line.format(at=f"localhost:{tls_broker.broker.port}")), err
    assert "not-the-password" not in err


async def test_untrusted_server_certificate_is_never_accepted(
    tls_broker: TlsBroker, cluster: PrivateCluster
) -> None:
    # The broker's certificate is not signed by the CA the ingester trusts. The source treats a
    # failed handshake like any failed connection: it keeps retrying with backoff (a broker may
    # be given a new certificate), stays not ready, and never sends its credentials.
    env = ingester_env(
        cluster.as_database(),
        tls_broker.url("ingest"),
        new_prefix(),
        INGEST_MQTT_TLS_CA_FILE=str(tls_broker.other_ca),
    )
    ingester = await Ingester(env).spawn()
    try:

        async def refused_again_and_again() -> bool:
            assert ingester.alive, ingester.log.decode()
            status, body = await http_get(ingester.port, "/readyz")
            if status != 0:
                assert status == 503, body
            return ingester.log.count(b"CERTIFICATE_VERIFY_FAILED") >= 3

        await wait_until(refused_again_and_again, timeout=60)
        status, body = await http_get(ingester.port, "/readyz")
        assert status == 503
        assert b"broker: not connected" in body.splitlines()
    finally:
        assert await ingester.stop() == 0, ingester.log.decode()
    assert env["INGEST_MQTT_CLIENT_ID"] not in tls_broker.broker.log()  # no CONNECT reached it
    assert tls_broker.passwords["ingest"] not in ingester.log.decode()


# ------------------------------------------------------------------------------ scram


async def test_passwords_are_stored_as_scram_sha_256(cluster: PrivateCluster) -> None:
    # The private cluster, provisioned like deploy/local/stack, and the shared stack itself.
    for dsn in (cluster.admin_dsn("postgres"), admin_dsn()):
        conn = await asyncpg.connect(dsn)
        try:
            rows = await conn.fetch(
                "SELECT rolname, rolpassword FROM pg_authid WHERE rolname = ANY($1::text[])",
                list(PG_ROLES),
            )
            methods = await conn.fetch(
                "SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type LIKE 'host%'"
            )
        finally:
            await conn.close()
        assert sorted(r["rolname"] for r in rows) == sorted(PG_ROLES), dsn
        for row in rows:
            assert row["rolpassword"].startswith("SCRAM-SHA-256$"), row["rolname"]
        assert [m["auth_method"] for m in methods] == ["scram-sha-256"], dsn


@pytest.mark.parametrize("role", PG_ROLES)
async def test_wrong_database_password_is_refused(cluster: PrivateCluster, role: str) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(cluster.url(role, password="wrong-password"))
    conn = await asyncpg.connect(cluster.url(role))  # and the right one is accepted
    await conn.close()


async def test_ingest_run_with_a_wrong_database_password_stops_with_one_line(
    cluster: PrivateCluster, mqtt_url: str
) -> None:
    db = cluster.as_database()
    bad = cluster.url("ingest", password="wrong-password")
    ingester = await Ingester(ingester_env(db, mqtt_url, new_prefix(), INGEST_DB_URL=bad)).spawn()
    code = await ingester.wait_exit()
    log = ingester.log.decode()
    assert code == 1, log
    lines = [line for line in log.splitlines() if "password authentication failed" in line]
    assert len(lines) == 1, log
    assert " ERROR " in lines[0]
    assert "Traceback" not in log
    assert "wrong-password" not in log


# ------------------------------------------------------------------------------ least privilege

# What the ingest role must not do: each must fail with SQLSTATE 42501 (insufficient_privilege).
# {chunk} is a chunk of the readings hypertable.
INGEST_FORBIDDEN = [
    "DELETE FROM telemetry.readings",
    "DELETE FROM telemetry.sensors",
    "DELETE FROM telemetry.dead_letters",
    "DELETE FROM {chunk}",
    "TRUNCATE telemetry.readings",
    "TRUNCATE telemetry.dead_letters",
    "TRUNCATE {chunk}",
    "SELECT drop_chunks('telemetry.readings', older_than => now())",
    "DROP TABLE telemetry.readings",
    "DROP TABLE telemetry.sensors",
    "DROP TABLE {chunk}",
    "DROP VIEW telemetry.readings_v",
    "ALTER TABLE telemetry.readings ADD COLUMN extra integer",
    "ALTER TABLE telemetry.sensors RENAME TO renamed",
    "ALTER TABLE telemetry.readings SET (timescaledb.compress)",
    "CREATE INDEX ON telemetry.readings (value)",
    "CREATE TABLE telemetry.extra (a integer)",
    "CREATE TABLE public.extra (a integer)",
    "CREATE VIEW telemetry.extra AS SELECT 1",
    "CREATE FUNCTION telemetry.extra() RETURNS integer LANGUAGE sql AS 'SELECT 1'",
    "CREATE SCHEMA extra",
    "UPDATE telemetry.readings SET value = 0",
    "UPDATE {chunk} SET value = 0",
    "UPDATE telemetry.sensors SET name = 'renamed'",
    "UPDATE telemetry.devices SET path = 'moved'",
    "UPDATE telemetry.dead_letters SET reason = 'hidden'",
    "INSERT INTO telemetry.schema_migrations (name, checksum) VALUES ('x', 'y')",
    "DELETE FROM telemetry.schema_migrations",
    "SELECT * FROM elsewhere.secrets",
    "INSERT INTO elsewhere.secrets VALUES (1)",
    "SELECT * FROM public.secrets",
    "INSERT INTO public.secrets VALUES (1)",
    "SELECT rolpassword FROM pg_authid",
    "SELECT pg_read_file('/etc/passwd')",
    "COPY telemetry.readings FROM '/etc/passwd'",
    "COPY telemetry.readings TO PROGRAM 'true'",
    "SET ROLE telemetry_owner",
    "ALTER ROLE ingest CREATEROLE",
    "COMMENT ON TABLE telemetry.readings IS 'mine'",
    # Asset models are written by `ingest baseline` as the owner, never by the service.
    "UPDATE telemetry.asset_models SET t2_limit = 1e9",
    "INSERT INTO telemetry.asset_models (device_id) VALUES (1)",
    "DELETE FROM telemetry.asset_models",
    "DELETE FROM telemetry.asset_state",
    "UPDATE telemetry.asset_state SET device_id = 0",
]


async def _chunk(cluster: PrivateCluster) -> str:
    conn = await asyncpg.connect(cluster.url("telemetry_owner"))
    try:
        chunk: str | None = await conn.fetchval(
            "SELECT format('%I.%I', chunk_schema, chunk_name) FROM timescaledb_information.chunks"
            " WHERE hypertable_schema = 'telemetry' AND hypertable_name = 'readings' LIMIT 1"
        )
    finally:
        await conn.close()
    assert chunk is not None, "the seeded reading made no chunk"
    return chunk


@pytest.mark.parametrize("statement", INGEST_FORBIDDEN)
async def test_ingest_role_cannot(cluster: PrivateCluster, statement: str) -> None:
    sql = statement.format(chunk=await _chunk(cluster)) if "{chunk}" in statement else statement
    conn = await asyncpg.connect(cluster.url("ingest"))
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
            async with conn.transaction():
                await conn.execute(sql)
        assert info.value.sqlstate == "42501"
    finally:
        await conn.close()


async def _tables_and_views(cluster: PrivateCluster) -> tuple[dict[str, str], list[str]]:
    """Every table of the telemetry schema with one of its columns, and every view."""
    conn = await asyncpg.connect(cluster.url("telemetry_owner"))
    try:
        tables = await conn.fetch(
            "SELECT format('%I.%I', c.table_schema, c.table_name) AS t, min(c.column_name) AS col"
            "  FROM information_schema.columns c JOIN information_schema.tables t"
            "    USING (table_schema, table_name)"
            " WHERE c.table_schema = 'telemetry' AND t.table_type = 'BASE TABLE' GROUP BY 1"
        )
        views = await conn.fetch(
            "SELECT format('%I.%I', schemaname, viewname) AS v FROM pg_views"
            " WHERE schemaname = 'telemetry'"
        )
    finally:
        await conn.close()
    return {r["t"]: r["col"] for r in tables}, sorted(r["v"] for r in views)


async def test_analyst_role_cannot_write_anything(cluster: PrivateCluster) -> None:
    tables, _ = await _tables_and_views(cluster)
    assert {"telemetry.readings", "telemetry.sensors", "telemetry.dead_letters"} <= set(tables)
    statements = [f"CREATE TABLE {s}.extra (a integer)" for s in ("telemetry", "public")]
    statements += ["CREATE TEMPORARY TABLE extra (a integer)", "CREATE SCHEMA extra"]
    for table, column in tables.items():
        statements += [
            f"INSERT INTO {table} DEFAULT VALUES",
            f'UPDATE {table} SET "{column}" = "{column}"',
            f"DELETE FROM {table}",
            f"TRUNCATE {table}",
            f"DROP TABLE {table}",
        ]
    allowed = []
    conn = await asyncpg.connect(cluster.url("analyst"))
    try:
        for sql in statements:
            try:
                async with conn.transaction():
                    await conn.execute(sql)
            except asyncpg.PostgresError as exc:
                if exc.sqlstate != "42501":
                    allowed.append(f"{sql}: {type(exc).__name__} {exc.sqlstate}")
            else:
                allowed.append(sql)
    finally:
        await conn.close()
    assert allowed == [], "the analyst role was not refused with 42501"


async def test_analyst_role_reads_every_view(cluster: PrivateCluster) -> None:
    _, views = await _tables_and_views(cluster)
    assert {"telemetry.readings_v", "telemetry.sensors_v", "telemetry.anomalies_v"} <= set(views)
    conn = await asyncpg.connect(cluster.url("analyst"))
    try:
        for view in views:
            await conn.fetch(f"SELECT * FROM {view} LIMIT 1")
        seeded = await conn.fetch(
            "SELECT device, sensor, value FROM telemetry.readings_v WHERE device = 'sec/dev'"
        )
        assert [tuple(r) for r in seeded] == [("sec/dev", "t", 1.5)]
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ no SQL from payload

# Calls whose first argument is SQL text (prepare and cursor only on something named like a
# connection: other objects have methods of those names), and calls whose first argument names
# a table.
SQL_CALLS = {"execute", "executemany", "fetch", "fetchrow", "fetchval", "copy_from_query"}
CONNECTION_SQL_CALLS = {"prepare", "cursor"}
TABLE_CALLS = {"copy_to_table", "copy_records_to_table", "copy_from_table"}
SQL_WORDS = re.compile(
    r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|TRUNCATE|COPY|GRANT|REVOKE|LOCK)\b"
)
# SQL that is not a constant of its module, and why it cannot hold payload content.
TRUSTED_ATTRIBUTES = {
    "migration.sql": "the schema/*.sql files shipped with the package (ingest migrate)",
    "upsert.sql": "an Upsert's SQL, checked where every Upsert is built (below)",
    "upsert.stage": "a StagedUpsert's table, checked where every StagedUpsert is built (below)",
    "upsert.stage_ddl": "a StagedUpsert's DDL, checked where every StagedUpsert is built (below)",
}
STAGED_FIELDS = ("stage", "stage_ddl", "sql")


class SqlSources:
    """Decides, per module, whether an expression is SQL text fixed before any payload exists.

    Safe: string literals; module-level names, assigned or imported (computed at import
    time, before any message arrives); f-strings, `%`, `+` and `.format()` of safe parts; `a if c else b` of safe a and
    b; loop variables unpacked from a safe iterable; a function's parameter when every call of
    the function in the module passes a safe value for it; the attributes listed in
    TRUSTED_ATTRIBUTES.
    """

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.constants: set[str] = set()
        for statement in tree.body:
            targets = statement.targets if isinstance(statement, ast.Assign) else []
            if isinstance(statement, ast.AnnAssign):
                targets = [statement.target]
            for target in targets:
                self.constants |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
            if isinstance(statement, ast.ImportFrom):
                self.constants |= {alias.asname or alias.name for alias in statement.names}
        for node in ast.walk(tree):  # a name rebound through `global` is not a constant
            if isinstance(node, ast.Global):
                self.constants -= set(node.names)
        self.functions = {
            node.name: node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        }
        self._parents = {
            child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)
        }
        self._checking: set[tuple[str, str]] = set()

    def function_of(self, node: ast.AST) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        while node in self._parents:
            node = self._parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node
        return None

    def safe(self, expr: ast.expr, scope: ast.FunctionDef | ast.AsyncFunctionDef | None) -> bool:
        match expr:
            case ast.Constant(value=str() | bytes() | int() | None):
                return True
            case ast.JoinedStr(values=values):
                return all(self.safe(v, scope) for v in values)
            case ast.FormattedValue(value=value):
                return self.safe(value, scope)
            case ast.BinOp(left=left, op=ast.Add() | ast.Mod(), right=right):
                return self.safe(left, scope) and self.safe(right, scope)
            case ast.Tuple(elts=elts) | ast.List(elts=elts):
                return all(self.safe(e, scope) for e in elts)
            case ast.IfExp(body=body, orelse=orelse):
                return self.safe(body, scope) and self.safe(orelse, scope)
            case ast.Call(func=ast.Attribute(value=base, attr="format"), args=args, keywords=kw):
                parts = [base, *args, *(k.value for k in kw)]
                return all(self.safe(p, scope) for p in parts)
            case ast.Call(func=ast.Name(id="list" | "tuple"), args=[arg]):
                return self.safe(arg, scope)
            case ast.Attribute():
                return ast.unparse(expr) in TRUSTED_ATTRIBUTES
            case ast.Name(id=name):
                if scope is None:
                    return name in self.constants
                return self._safe_local(name, scope) or (
                    name in self.constants and not self._assigned_in(name, scope)
                )
        return False

    def _assigned_in(self, name: str, scope: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        params = scope.args.posonlyargs + scope.args.args + scope.args.kwonlyargs
        return name in {a.arg for a in params} or any(
            isinstance(n, ast.Name) and n.id == name and isinstance(n.ctx, ast.Store)
            for n in ast.walk(scope)
        )

    def _safe_local(self, name: str, scope: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        params = [a.arg for a in scope.args.posonlyargs + scope.args.args + scope.args.kwonlyargs]
        sources: list[bool] = []
        if name in params:
            sources.append(self._safe_parameter(scope, name, params.index(name)))
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    sources.append(self.safe(node.value, scope))
            elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
                bound = {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
                if name in bound:
                    sources.append(self.safe(node.iter, self.function_of(node.iter)))
        return bool(sources) and all(sources)

    def _safe_parameter(
        self, function: ast.FunctionDef | ast.AsyncFunctionDef, name: str, position: int
    ) -> bool:
        key = (function.name, name)
        if key in self._checking:  # recursion: judged by the other call sites
            return True
        self._checking.add(key)
        try:
            if isinstance(self._parents.get(function), ast.ClassDef):
                position -= 1  # self
            calls = [
                node
                for node in ast.walk(self.tree)
                if isinstance(node, ast.Call)
                and (
                    (isinstance(node.func, ast.Name) and node.func.id == function.name)
                    or (isinstance(node.func, ast.Attribute) and node.func.attr == function.name)
                )
            ]
            if not calls:
                return False  # called from elsewhere: cannot tell
            for call in calls:
                passed = [k.value for k in call.keywords if k.arg == name]
                if not passed and 0 <= position < len(call.args):
                    passed = [call.args[position]]
                if not passed or not self.safe(passed[0], self.function_of(call)):
                    return False
            return True
        finally:
            self._checking.discard(key)


def sql_problems(source: str, filename: str) -> Iterator[str]:
    """Every place in `source` where SQL text or a table name is not fixed in advance."""
    for problem in sql_check(source, filename):
        if problem:
            yield problem


def sql_check(source: str, filename: str) -> Iterator[str]:
    """Yields "" for every call checked and sound, and a description for every problem."""
    tree = ast.parse(source, filename)
    check = SqlSources(tree)
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        scope = check.function_of(node)
        if isinstance(node, ast.Call):
            name = None
            if isinstance(node.func, ast.Name):
                name = node.func.id
            elif isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if name in CONNECTION_SQL_CALLS and "conn" in ast.unparse(node.func.value):
                    name = "execute"
            first = [k.value for k in node.keywords if k.arg in ("query", "sql", "table_name")]
            first = first or node.args[:1]
            if name in SQL_CALLS | TABLE_CALLS | {"Upsert"} and first:
                sound = check.safe(first[0], scope)
                yield "" if sound else f"{where}: {name}() gets {ast.unparse(first[0])!r}"
            if name == "StagedUpsert":
                if node.args:
                    yield f"{where}: StagedUpsert() takes its SQL by keyword"
                for keyword in node.keywords:
                    if keyword.arg in STAGED_FIELDS:
                        sound = check.safe(keyword.value, scope)
                        yield "" if sound else f"{where}: StagedUpsert({keyword.arg}=...)"
            if name in TABLE_CALLS:
                for keyword in node.keywords:
                    if keyword.arg == "schema_name" and not check.safe(keyword.value, scope):
                        yield f"{where}: {name}(schema_name={ast.unparse(keyword.value)!r})"
        elif isinstance(node, ast.JoinedStr | ast.BinOp) or (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
        ):
            text = " ".join(
                n.value
                for n in ast.walk(node)
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
            )
            if SQL_WORDS.search(text) and not check.safe(node, scope):
                yield f"{where}: SQL text built from {ast.unparse(node)[:120]!r}"


def test_no_sql_text_is_built_from_anything_but_constants() -> None:
    modules = sorted((ROOT / "ingest").rglob("*.py"))
    findings = [
        finding
        for path in modules
        for finding in sql_check(path.read_text(), path.relative_to(ROOT).as_posix())
    ]
    assert [problem for problem in findings if problem] == []
    assert len(findings) >= 15, "the check no longer sees the package's queries"


@pytest.mark.parametrize(
    "source",
    [
        "async def f(conn, msg):\n    await conn.execute(f\"INSERT INTO t VALUES ('{msg.topic}')\")\n",
        "async def f(conn, topic):\n    q = 'SELECT * FROM t WHERE a = ' + topic\n    await conn.fetch(q)\n",
        "async def f(conn, name):\n    await conn.fetchval('SELECT %s' % name)\n",
        "async def f(conn, name):\n    await conn.execute('DROP TABLE {}'.format(name))\n",
        "async def f(conn, msg):\n    await conn.copy_records_to_table(msg.topic, records=[])\n",
        "async def f(conn, s):\n    await conn.copy_to_table('t', schema_name=s, source=b'')\n",
        "def f(name):\n    return Upsert(f'UPDATE t SET a = {name}', ())\n",
        "def f(name):\n    return StagedUpsert(stage=name, stage_ddl='', data=b'', rows=0, sql='')\n",
        "def f(q):\n    return StagedUpsert('t', 'CREATE TEMP TABLE t ()', b'', 0, q)\n",
        "SQL = 'SELECT 1'\nasync def f(conn, x):\n    SQL = x\n    await conn.execute(SQL)\n",
        "def g(x):\n    return f'SELECT {x}'\n",
        "async def run(conn, q):\n    await conn.execute(q)\nasync def f(conn, m):\n    await run(conn, m.topic)\n",
        "Q = 'SELECT 1'\nasync def f(conn, m, dry):\n    await conn.fetch(Q if dry else m.topic)\n",
    ],
    ids=[
        "fstring",
        "concat",
        "percent",
        "format",
        "table",
        "schema",
        "upsert",
        "staged",
        "staged-positional",
        "rebound",
        "built",
        "param",
        "ifexp",
    ],
)
def test_the_sql_check_finds_sql_built_from_values(source: str) -> None:
    assert list(sql_problems(source, "bad.py")), "the check missed it"


def test_the_sql_check_accepts_constants() -> None:
    source = (
        "_T = '(x * {})'\n"
        "def _sql(table):\n    return f'INSERT INTO {table} SELECT {_T.format(1)}'\n"
        "TABLES = (('a', _sql('a')), ('b', _sql('b')))\n"
        "Q = 'SELECT 1'\n"
        "R = 'SELECT 2'\n"
        "async def f(conn, m, dry):\n"
        "    await conn.execute(Q, m.topic)\n"
        "    await conn.fetch(Q if dry else R, m.topic)\n"
        "    for name, sql in TABLES:\n        await conn.execute(sql, name)\n"
        "    await conn.copy_records_to_table('dead_letters', schema_name='telemetry', records=[m])\n"
        "from ingest.rollup import MINUTE_US\n"
        "S = f'SELECT {MINUTE_US}'\n"
        "def g(d):\n    return StagedUpsert(stage='s', stage_ddl=S, data=d, rows=1, sql=Q)\n"
    )
    assert list(sql_problems(source, "good.py")) == []
