"""The sink against a real scratch database: COPY, redelivery, dead letters and extras,
compared row for row with what the database holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.db.binary_copy import PG_EPOCH_US, copy_data, readings_copy
from ingest.db.dead_letters import DeadLetter
from ingest.db.sink import Appended, Extra, Readings, Sink, StagedUpsert, Upsert
from ingest.errors import PermanentSinkError
from tests.support.cluster import Database, admin_dsn
from tests.support.process import wait_until
from tests.support.streams import T0


@dataclass(slots=True)
class _Extras:
    upserts: list[Extra] = field(default_factory=list)


def _readings(sensors: list[int], t: int = T0) -> Readings:
    n = len(sensors)
    return Readings(
        np.full(n, t, np.int64),
        np.array(sensors, np.int32),
        np.arange(n, dtype=np.float64),
        np.zeros(n, np.uint8),
    )


@pytest.fixture
async def sink(database: Database) -> AsyncIterator[Sink]:
    sink = Sink(dsn=database.ingest_url)
    await sink.connect()
    try:
        yield sink
    finally:
        await sink.close()


async def _waiting_for_lock(conn: asyncpg.Connection, pid: int) -> bool:
    kind = await conn.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid)
    return bool(kind == "Lock")


async def test_redelivery_learns_the_inserted_rows_from_the_insert(
    database: Database, sink: Sink
) -> None:
    """Keys that another ingester commits between the staging and the insert of a redelivered
    slab are neither counted as inserted nor given to derive (they would be rolled up twice)."""
    # Sensor ids of their own: the database is shared with other tests (readings have no
    # foreign key to the registry).
    base = int(np.random.default_rng().integers(1 << 30, (1 << 31) - 8))
    stored, racing, new = [base + 1, base + 2], [base + 3, base + 4], [base + 5, base + 6]
    derived: list[list[int]] = []

    def derive(rows: Readings) -> _Extras:
        derived.append(rows.sensor.tolist())
        return _Extras()

    await sink.write(readings=_readings(stored), dead_letters=(), derive=derive)
    other = await asyncpg.connect(database.ingest_url)
    watcher = await asyncpg.connect(admin_dsn(database.name))  # sees every session's waits
    try:
        # Another ingester inserts the racing keys and has not committed yet.
        tx = other.transaction()
        await tx.start()
        await other.copy_records_to_table(
            "readings",
            schema_name="telemetry",
            columns=["time", "sensor_id", "value", "quality"],
            records=[(datetime.fromtimestamp(T0 / 1e6, UTC), s, 0.0, 0) for s in racing],
        )
        pid = sink.connection.get_server_pid()
        write = asyncio.create_task(
            sink.write(readings=_readings(stored + racing + new), dead_letters=(), derive=derive)
        )
        # The COPY meets the stored keys first and is rolled back; the staged insert then
        # waits on the racing keys: the other ingester commits them now.
        await wait_until(lambda: _waiting_for_lock(watcher, pid))
        await tx.commit()
        result, _ = await write
    finally:
        await other.close()
        await watcher.close()
    assert result.staged
    assert (result.inserted, result.duplicates) == (2, 4)
    assert derived[-1] == new


async def test_appended_rows_go_only_to_appendable_tables(database: Database, sink: Sink) -> None:
    with pytest.raises(ValueError, match="not appendable"):
        Appended(table="readings", columns=("time",), data=memoryview(b""), rows=0)


# ------------------------------------------------------------------------------ exact contents
# Each test below has a database of its own (`db`), so that it can compare whole tables.

_ROWS = (
    "SELECT (extract(epoch FROM time) * 1000000)::bigint, sensor_id, value, quality"
    "  FROM telemetry.readings ORDER BY sensor_id, time"
)


def _slab(rows: list[tuple[int, int, float, int]]) -> Readings:
    """A slab from (time µs, sensor, value, quality) rows, sorted by (sensor, time)."""
    rows = sorted(rows, key=lambda r: (r[1], r[0]))
    return Readings(
        np.array([r[0] for r in rows], np.int64),
        np.array([r[1] for r in rows], np.int32),
        np.array([r[2] for r in rows], np.float64),
        np.array([r[3] for r in rows], np.uint8),
    )


def _as_rows(readings: Readings) -> list[tuple[int, int, float, int]]:
    return list(
        zip(
            readings.time.tolist(),
            readings.sensor.tolist(),
            readings.value.tolist(),
            readings.quality.tolist(),
            strict=True,
        )
    )


@pytest.fixture
async def own_sink(db: Database) -> AsyncIterator[Sink]:
    sink = Sink(dsn=db.ingest_url)
    await sink.connect()
    try:
        yield sink
    finally:
        await sink.close()


async def _fetch(db: Database, sql: str) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(db.owner_url)
    try:
        return [tuple(r) for r in await conn.fetch(sql)]
    finally:
        await conn.close()


@dataclass(slots=True)
class _Derived:
    """What derive was given; the sink returns the one whose extras it committed."""

    rows: list[tuple[int, int, float, int]]
    upserts: list[Extra] = field(default_factory=list)


def _derive(rows: Readings) -> _Derived:
    return _Derived(_as_rows(rows))


async def test_a_flush_is_copied_row_for_row(db: Database, own_sink: Sink) -> None:
    rows = [
        (T0, 7, 21.5, 0),
        (T0 + 1, 7, -0.0, 0),  # a microsecond later
        (T0 + 1_000_000, 7, 1e300, 192),
        (T0, 3, -273.15, 1),
        (T0 - 3_600_000_000, 3, 5e-324, 255),  # an hour earlier; the smallest double
    ]
    result, used = await own_sink.write(readings=_slab(rows), dead_letters=(), derive=_derive)
    assert (result.inserted, result.duplicates, result.staged) == (5, 0, False)
    assert used.rows == _as_rows(_slab(rows))  # derive saw every row, in the slab's order
    assert await _fetch(db, _ROWS) == sorted(
        [(t, s, v, q) for t, s, v, q in rows], key=lambda r: (r[1], r[0])
    )


async def test_a_redelivery_inserts_and_reports_exactly_the_new_rows(
    db: Database, own_sink: Sink
) -> None:
    first = [(T0 + i, s, float(10 * s + i), 0) for s in (1, 2) for i in range(3)]
    await own_sink.write(readings=_slab(first), dead_letters=(), derive=_derive)

    # The same keys again, with other values: nothing is inserted and nothing overwritten.
    again = [(t, s, v + 0.5, 9) for t, s, v, _ in first]
    result, used = await own_sink.write(readings=_slab(again), dead_letters=(), derive=_derive)
    assert (result.inserted, result.duplicates, result.staged) == (0, 6, True)
    assert used.rows == []
    assert await _fetch(db, _ROWS) == sorted(first, key=lambda r: (r[1], r[0]))

    # Half stored already, half new: exactly the new half is inserted and given to derive.
    new = [(T0 + 3, 1, 13.0, 0), (T0 + 4, 1, 14.0, 0), (T0, 3, 30.0, 5)]
    mixed = [first[1], first[4], *new]
    result, used = await own_sink.write(readings=_slab(mixed), dead_letters=(), derive=_derive)
    assert (result.inserted, result.duplicates, result.staged) == (3, 2, True)
    assert used.rows == _as_rows(_slab(new))
    assert await _fetch(db, _ROWS) == sorted(first + new, key=lambda r: (r[1], r[0]))


async def test_dead_letters_are_stored_with_their_raw_bytes(db: Database, own_sink: Sink) -> None:
    letters = [
        DeadLetter(T0, "p/site/dev-1", b"\x00\xc1\xff", "payload: no batch", "application/msgpack"),
        DeadLetter(T0 + 1, "p/site/dev-2", b"", "payload: empty", None),
        DeadLetter(T0 + 2, "p/site/'; DROP TABLE x; --", b'{"v": 1}', "ch: missing", "text/x"),
    ]
    readings = _slab([(T0, 1, 1.0, 0)])
    result, _ = await own_sink.write(readings=readings, dead_letters=letters, derive=_derive)
    assert result.inserted == 1
    # A flush of dead letters only.
    late = DeadLetter(T0 + 3, "p/site/dev-3", b"x" * 70_000, "payload: too large", None)
    result, _ = await own_sink.write(readings=_slab([]), dead_letters=[late], derive=_derive)
    assert result.inserted == 0
    stored = await _fetch(
        db,
        "SELECT (extract(epoch FROM received_at) * 1000000)::bigint, topic, payload, reason,"
        " content_type FROM telemetry.dead_letters ORDER BY received_at",
    )
    assert stored == [
        (d.received_us, d.topic, d.payload, d.reason, d.content_type) for d in [*letters, late]
    ]
    assert await _fetch(db, _ROWS) == [(T0, 1, 1.0, 0)]


async def test_a_message_delivered_again_is_one_dead_letter(db: Database, own_sink: Sink) -> None:
    bad = DeadLetter(T0, "p/site/dev-1", b"\xc1", "payload: malformed", "application/msgpack")
    # Redelivered after a crash between commit and acknowledgement, and twice in one flush.
    again = DeadLetter(T0 + 5_000_000, bad.topic, bad.payload, bad.reason, bad.content_type)
    other_topic = DeadLetter(T0 + 1, "p/site/dev-2", bad.payload, bad.reason, bad.content_type)
    other_type = DeadLetter(T0 + 2, bad.topic, bad.payload, bad.reason, None)
    await own_sink.write(readings=_slab([]), dead_letters=[bad], derive=_derive)
    await own_sink.write(
        readings=_slab([]), dead_letters=[again, other_topic, again], derive=_derive
    )
    await own_sink.write(readings=_slab([]), dead_letters=[other_type, bad], derive=_derive)
    # Outside the window (a day here) the same message is stored again.
    later = DeadLetter(T0 + 90_000_000_000, bad.topic, bad.payload, bad.reason, bad.content_type)
    await own_sink.write(readings=_slab([]), dead_letters=[later], derive=_derive)
    stored = await _fetch(
        db,
        "SELECT (extract(epoch FROM received_at) * 1000000)::bigint, topic, content_type"
        "  FROM telemetry.dead_letters ORDER BY received_at",
    )
    assert stored == [
        (T0, bad.topic, "application/msgpack"),
        (T0 + 1, other_topic.topic, "application/msgpack"),
        (T0 + 2, bad.topic, None),
        (later.received_us, bad.topic, "application/msgpack"),
    ]


_PENDING = (
    "SELECT (extract(epoch FROM bucket) * 1000000)::bigint, sensor_id, min, max, sum, count,"
    " first, (extract(epoch FROM first_time) * 1000000)::bigint, last,"
    " (extract(epoch FROM last_time) * 1000000)::bigint FROM telemetry.rollup_pending"
    " ORDER BY sensor_id"
)
_PENDING_COLUMNS = (
    "bucket", "sensor_id", "min", "max", "sum", "count", "first", "first_time", "last",
    "last_time",
)  # fmt: skip


def _pending(rows: list[tuple[int, int, float, float, float, int, float, int, float, int]]) -> Any:
    """COPY data of rollup_pending rows (times in Unix µs)."""
    cols = list(zip(*rows, strict=True))
    wire = (">i8", ">i4", ">f8", ">f8", ">f8", ">i8", ">f8", ">i8", ">f8", ">i8")
    times = {0, 7, 9}
    return copy_data(
        [
            (w, np.array(c, np.int64) - PG_EPOCH_US if i in times else np.array(c))
            for i, (w, c) in enumerate(zip(wire, cols, strict=True))
        ]
    )


async def test_extras_commit_with_the_flush_or_not_at_all(db: Database, own_sink: Sink) -> None:
    partial = (T0, 1, 1.0, 2.0, 3.0, 2, 1.0, T0, 2.0, T0 + 1)
    appended = Appended(
        table="rollup_pending", columns=_PENDING_COLUMNS, data=_pending([partial]), rows=1
    )
    staged = StagedUpsert(
        stage="pending_stage",
        stage_ddl="CREATE TEMPORARY TABLE IF NOT EXISTS pending_stage"
        " (LIKE telemetry.rollup_pending) ON COMMIT DELETE ROWS",
        data=_pending([(T0, 2, 5.0, 5.0, 5.0, 1, 5.0, T0, 5.0, T0)]),
        rows=1,
        sql="INSERT INTO telemetry.rollup_pending SELECT * FROM pending_stage",
    )
    failing = Upsert("SELECT 1 / (cardinality($1::int[]) - 1)", ([1],))  # division by zero

    def extras(*upserts: Extra) -> Callable[[Readings], _Extras]:
        return lambda rows: _Extras(list(upserts))

    # A failing extra takes the whole flush with it, stage table included.
    with pytest.raises(PermanentSinkError, match="SQLSTATE 22012"):
        await own_sink.write(
            readings=_slab([(T0, 1, 1.0, 0)]),
            dead_letters=[DeadLetter(T0, "p/d", b"x", "r", None)],
            derive=extras(appended, staged, failing),
        )
    assert await _fetch(db, _ROWS) == []
    assert await _fetch(db, "SELECT * FROM telemetry.dead_letters") == []
    assert await _fetch(db, _PENDING) == []

    # The connection is still usable, and creates the stage table again.
    result, _ = await own_sink.write(
        readings=_slab([(T0, 1, 1.0, 0), (T0 + 1, 1, 2.0, 0)]),
        dead_letters=(),
        derive=extras(appended, staged),
    )
    assert result.inserted == 2
    assert await _fetch(db, _PENDING) == [partial, (T0, 2, 5.0, 5.0, 5.0, 1, 5.0, T0, 5.0, T0)]
    # The stage table is emptied at commit, and reused by the next flush.
    await own_sink.write(readings=_slab([]), dead_letters=(), derive=extras(staged))
    assert len(await _fetch(db, _PENDING)) == 3


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.integers(-(2**62), 2**62),
            st.integers(-(2**31), 2**31 - 1),
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(0, 255),
        ),
        max_size=40,
    )
)
def test_readings_copy_is_the_copy_data_of_its_columns(
    rows: list[tuple[int, int, float, int]],
) -> None:
    time = np.array([r[0] for r in rows], np.int64)
    sensor = np.array([r[1] for r in rows], np.int32)
    value = np.array([r[2] for r in rows], np.float64)
    quality = np.array([r[3] for r in rows], np.uint8)
    wire: list[tuple[str, Any]] = [
        (">i8", time - PG_EPOCH_US),
        (">i4", sensor),
        (">f8", value),
        (">i2", quality),
    ]
    assert bytes(readings_copy(time, sensor, value, quality)) == bytes(copy_data(wire))
