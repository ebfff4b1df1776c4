"""Rollup partials held in memory across flushes (ingest.partials, ingest.db.rollups): merged
exactly, and a journal that makes them crash-safe against the real database."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import fields

import asyncpg
import numpy as np
import pytest

from ingest.db.binary_copy import PG_EPOCH_US
from ingest.db.registry import Registry, SensorKey
from ingest.db.rollups import RollupMerger, new_epoch, recover_orphans
from ingest.db.sink import Readings, Sink
from ingest.derive import Deriver
from ingest.partials import PartialsJournal, journal_row, partials_copy
from ingest.rollup import HOUR_US, MINUTE_US, ROLLUP_FIELDS, Rollup, merge_partials, rollup
from tests.support.cluster import Database
from tests.support.process import wait_until
from tests.support.streams import T0

SECOND = 1_000_000
Reading = tuple[int, int, float]  # sensor id, time (µs), value


def _equal(got: Rollup, want: Rollup) -> None:
    for f in fields(Rollup):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if f.name == "sum":
            np.testing.assert_allclose(a, b, rtol=1e-12)
        else:
            np.testing.assert_array_equal(a, b, err_msg=f.name)


def test_merged_partials_of_any_split_equal_one_rollup_of_everything() -> None:
    rng = np.random.default_rng(3)
    sensor = np.repeat(np.arange(1, 8, dtype=np.int32), 400)
    time = np.tile(T0 + np.arange(400, dtype=np.int64) * 11 * SECOND, 7)
    value = rng.normal(0, 1, len(time))
    value[rng.random(len(time)) < 0.05] = np.nan  # NaN is stored, never rolled up
    # Flushes of arbitrary pieces of the stream, each sorted by (sensor, time).
    cut = np.sort(rng.choice(len(time), 30, replace=False))
    pieces = np.split(rng.permutation(len(time)), cut)
    parts = []
    for piece in pieces:
        idx = np.sort(piece)  # the stream is sorted by (sensor, time): so is each subset
        parts.append(
            rollup(sensor=sensor[idx], time=time[idx], value=value[idx], bucket_us=MINUTE_US)
        )
    for width in (MINUTE_US, HOUR_US):
        want = rollup(sensor=sensor, time=time, value=value, bucket_us=width)
        _equal(merge_partials(parts, bucket_us=width), want)
    with pytest.raises(ValueError, match="divisor of one day"):
        merge_partials(parts, bucket_us=7 * 60_000_000 + 1)


def test_journal_keeps_partials_merged_and_puts_a_failed_merge_back() -> None:
    journal = PartialsJournal()
    with pytest.raises(RuntimeError, match="no epoch"):
        journal.entry(np.array([1], np.int32), np.array([T0], np.int64))
    journal.epoch = 5
    s = np.array([1, 2], np.int32)
    for k in range(3):
        t = np.full(2, T0 + k * 20 * SECOND, np.int64)
        flush, row = journal.entry(s, t)
        assert row.table == "rollup_journal"
        assert row.rows == 1
        journal.add(
            flush, rollup(sensor=s, time=t, value=np.array([k, -k], float), bucket_us=MINUTE_US)
        )
    held = journal.take()
    assert held is not None
    assert held.epoch == 5
    assert held.flushes == [1, 2, 3]
    assert held.minute.sensor.tolist() == [1, 2]
    assert held.minute.count.tolist() == [3, 3]
    assert held.minute.min.tolist() == [0.0, -2.0]
    assert held.minute.last.tolist() == [2.0, -2.0]
    assert len(held.hour) == 2
    assert journal.take() is None
    journal.put_back(held)
    again = journal.take()
    assert again is not None
    assert again.flushes == [1, 2, 3]
    _equal(again.minute, held.minute)


def test_held_partials_of_late_and_repeated_buckets_equal_one_merge_of_everything() -> None:
    rng = np.random.default_rng(8)
    journal = PartialsJournal()
    journal.epoch = 1
    parts: list[Rollup] = []
    for flush in range(60):
        n = int(rng.integers(1, 400))
        # Times anywhere in ten minutes: later, earlier (late data) and repeated buckets.
        key = np.unique(rng.integers(0, 2_000, n) * 10_000 + rng.integers(0, 600, n))
        sensor, time = (key // 10_000).astype(np.int32), T0 + (key % 10_000) * SECOND
        part = rollup(
            sensor=sensor, time=time, value=rng.normal(0, 1, len(key)), bucket_us=MINUTE_US
        )
        parts.append(part)
        journal.add(flush, part)
        if flush == 30:
            held = journal.take()
            assert held is not None
            journal.put_back(held)  # a merge that did not commit
    held = journal.take()
    assert held is not None
    assert held.flushes == list(range(60))
    _equal(held.minute, merge_partials(parts, bucket_us=MINUTE_US))
    _equal(held.hour, merge_partials(parts, bucket_us=HOUR_US))
    assert journal.take() is None


class _Instance:
    """One ingester's writing side with its journal, and its merger."""

    def __init__(self, db: Database) -> None:
        self.registry = Registry()
        self.journal = PartialsJournal()
        self.deriver = Deriver(rules=[], rollups=True, registry=self.registry, journal=self.journal)
        self.sink = Sink(dsn=db.ingest_url, jit=False)
        self.merger = RollupMerger(
            dsn=db.ingest_url, connect_timeout_s=10, interval_s=3600, journal=self.journal
        )

    async def start(self) -> None:
        await self.sink.connect()
        self.journal.epoch = await new_epoch(self.sink.connection)

    async def close(self) -> None:
        await self.sink.close()
        await self.merger.close(wait_s=5)

    async def write(self, device: str, readings: list[tuple[str, int, float]]) -> list[Reading]:
        """One flush; returns its readings by sensor id."""
        conn = self.sink.connection
        levels = tuple(device.split("/"))
        await self.registry.resolve(
            conn, sensors={SensorKey(levels, n): None for n, _, _ in readings}
        )
        rows = sorted((self.registry.get(SensorKey(levels, n)) or 0, t, v) for n, t, v in readings)
        slab = Readings(
            np.array([r[1] for r in rows], np.int64),
            np.array([r[0] for r in rows], np.int32),
            np.array([r[2] for r in rows], np.float64),
            np.zeros(len(rows), np.uint8),
        )
        _, derived = await self.sink.write(
            readings=slab, dead_letters=(), derive=self.deriver.derive
        )
        self.deriver.commit(derived)
        return rows


def _expected(readings: Iterable[Reading], width: int) -> list[tuple[object, ...]]:
    groups: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for s, t, v in readings:
        groups.setdefault((s, t - t % width), []).append((t, v))
    out: list[tuple[object, ...]] = []
    for (s, b), tv in sorted(groups.items()):
        tv.sort()
        vs = [v for _, v in tv]
        out.append(
            (b, s, min(vs), max(vs), round(sum(vs), 9), len(vs), vs[0], tv[0][0], vs[-1], tv[-1][0])
        )
    return out


_ROWS = """
SELECT (extract(epoch FROM bucket) * 1000000)::int8 AS b, sensor_id, min, max, round(sum::numeric, 9)::float8,
       count, first, (extract(epoch FROM first_time) * 1000000)::int8, last,
       (extract(epoch FROM last_time) * 1000000)::int8
  FROM telemetry.{} WHERE sensor_id = ANY($1::int[]) ORDER BY sensor_id, bucket
"""


async def _rows(db: Database, table: str, sensors: list[int]) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(db.owner_url)
    try:
        if table == "rollup_1m":
            got = await conn.fetch(_ROWS.format("rollup_1m"), sensors)
        elif table == "rollup_1h":
            got = await conn.fetch(_ROWS.format("rollup_1h"), sensors)
        elif table == "rollup_1m_all":
            got = await conn.fetch(_ROWS.format("rollup_1m_all"), sensors)
        else:
            raise AssertionError(table)
    finally:
        await conn.close()
    return [tuple(r) for r in got]


async def _count(db: Database, sql: str, *args: object) -> int:
    conn = await asyncpg.connect(db.owner_url)
    try:
        return int(await conn.fetchval(sql, *args))
    finally:
        await conn.close()


def _stream(device: str, rounds: range, sensors: int = 4) -> list[tuple[str, int, float]]:
    return [
        (f"tag.{s}", T0 + r * 25 * SECOND, float(r * 10 + s))
        for r in rounds
        for s in range(sensors)
    ]


async def _two(db: Database) -> tuple[_Instance, _Instance, str]:
    a, b = _Instance(db), _Instance(db)
    await a.start()
    await b.start()
    return a, b, f"site-{uuid.uuid4().hex[:8]}/line/plc"


_OF_EPOCH = "SELECT count(*) FROM telemetry.rollup_journal WHERE epoch = $1"


async def test_a_killed_ingesters_journal_is_recovered_exactly(database: Database) -> None:
    a, b, device = await _two(database)
    try:
        # Two ingesters write alternate flushes of one device: the same sensors and buckets.
        written: list[Reading] = []
        for r in range(6):
            writer = a if r % 2 == 0 else b
            written += await writer.write(device, _stream(device, range(r, r + 1)))
        sensors = sorted({s for s, _, _ in written})
        assert await _rows(database, "rollup_1m_all", sensors) == _expected(written, MINUTE_US)
        # b is killed: its partials never reach a merge, its epoch's lock is free.
        await b.sink.close()
        assert await _count(database, _OF_EPOCH, b.journal.epoch) == 3
        await a.merger.merge_once()
        assert await _count(database, _OF_EPOCH, b.journal.epoch) == 0
        assert await _rows(database, "rollup_1m", sensors) == _expected(written, MINUTE_US)
        assert await _rows(database, "rollup_1h", sensors) == _expected(written, HOUR_US)
        assert await _count(database, _OF_EPOCH, a.journal.epoch) == 0
    finally:
        await a.close()
        await b.close()


async def test_a_running_ingesters_journal_is_left_to_it(database: Database) -> None:
    a, b, device = await _two(database)
    try:
        await b.merger.merge_once()  # b's merger holds its epoch from now on
        written = await a.write(device, _stream(device, range(0, 2)))
        written += await b.write(device, _stream(device, range(2, 4)))
        sensors = sorted({s for s, _, _ in written})
        await a.merger.merge_once()
        assert await _count(database, _OF_EPOCH, b.journal.epoch) == 1
        assert await _rows(database, "rollup_1m_all", sensors) == _expected(written, MINUTE_US)
        await b.merger.merge_once()
        assert await _rows(database, "rollup_1m", sensors) == _expected(written, MINUTE_US)
        assert await _rows(database, "rollup_1h", sensors) == _expected(written, HOUR_US)
    finally:
        await a.close()
        await b.close()


async def test_partials_whose_journal_was_recovered_meanwhile_are_not_merged_twice(
    database: Database,
) -> None:
    a, b, device = await _two(database)
    try:
        written = await b.write(device, _stream(device, range(0, 2)))  # b's epoch not locked yet
        sensors = sorted({s for s, _, _ in written})
        conn = await asyncpg.connect(database.ingest_url)
        try:
            assert await recover_orphans(conn, epoch=a.journal.epoch or 0) >= 1
        finally:
            await conn.close()
        written += await b.write(device, _stream(device, range(2, 3)))
        # b holds the partials of both flushes; the first one's journal row is gone.
        await b.merger.merge_once()
        assert len(b.journal) == 0
        assert await _count(database, _OF_EPOCH, b.journal.epoch) == 0
        assert await _rows(database, "rollup_1m", sensors) == _expected(written, MINUTE_US)
        assert await _rows(database, "rollup_1h", sensors) == _expected(written, HOUR_US)
    finally:
        await a.close()
        await b.close()


_ENDED = "SELECT count(*) = 0 FROM pg_stat_activity WHERE pid = $1"


def _ended(db: Database, pid: int) -> Callable[[], Awaitable[bool]]:
    async def ended() -> bool:
        conn = await asyncpg.connect(db.owner_url)
        try:
            return bool(await conn.fetchval(_ENDED, pid))
        finally:
            await conn.close()

    return ended


async def test_a_flush_whose_commit_went_unheard_is_recovered_once_its_server_process_ends(
    database: Database,
) -> None:
    a, b, device = await _two(database)
    lost = Sink(dsn=database.ingest_url, jit=False)
    try:
        written = await a.write(device, _stream(device, range(0, 2)))
        # A flush that commits on a connection whose outcome never reached the ingester.
        await lost.connect()
        pid = lost.connection.get_server_pid()
        levels = tuple(device.split("/"))
        rows = sorted(
            (a.registry.get(SensorKey(levels, n)) or 0, t, v)
            for n, t, v in _stream(device, range(2, 4))
        )
        slab = Readings(
            np.array([r[1] for r in rows], np.int64),
            np.array([r[0] for r in rows], np.int32),
            np.array([r[2] for r in rows], np.float64),
            np.zeros(len(rows), np.uint8),
        )
        _, derived = await lost.write(readings=slab, dead_letters=(), derive=a.deriver.derive)
        a.deriver.in_doubt(pid, [derived])
        written += rows
        sensors = sorted({s for s, _, _ in written})
        await a.merger.merge_once()  # its server process still runs: the row may yet commit
        assert await _count(database, _OF_EPOCH, a.journal.epoch) == 1
        assert await _rows(database, "rollup_1m", sensors) == _expected(written[:8], MINUTE_US)
        assert await _rows(database, "rollup_1m_all", sensors) == _expected(written, MINUTE_US)
        lost.discard()
        await wait_until(_ended(database, pid))
        await a.merger.merge_once()
        assert await _count(database, _OF_EPOCH, a.journal.epoch) == 0
        assert a.journal.doubtful() == {}
        assert await _rows(database, "rollup_1m", sensors) == _expected(written, MINUTE_US)
        assert await _rows(database, "rollup_1h", sensors) == _expected(written, HOUR_US)
    finally:
        lost.discard()
        await a.close()
        await b.close()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 1001])
def test_journal_row_is_the_binary_copy_of_its_arrays(n: int) -> None:
    rng = np.random.default_rng(n)
    sensor = rng.integers(-(2**31), 2**31, n).astype(np.int32)
    time = rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)

    def array(values: Iterable[int], width: int, oid: int) -> bytes:
        body = [(1).to_bytes(4, "big"), bytes(4), oid.to_bytes(4, "big")]
        body += [n.to_bytes(4, "big"), (1).to_bytes(4, "big")]
        for v in values:
            body.append(width.to_bytes(4, "big") + v.to_bytes(width, "big", signed=True))
        data = b"".join(body)
        return len(data).to_bytes(4, "big") + data

    expected = b"".join(
        [
            b"PGCOPY\n\xff\r\n\x00" + bytes(8),
            (4).to_bytes(2, "big"),
            (8).to_bytes(4, "big") + (7).to_bytes(8, "big"),
            (8).to_bytes(4, "big") + (123456789012).to_bytes(8, "big"),
            array(sensor.tolist(), 4, 23),
            array(time.tolist(), 8, 20),
            b"\xff\xff",
        ]
    )
    assert bytes(journal_row(7, 123456789012, sensor, time)) == expected


@pytest.mark.parametrize("n", [0, 1, 2, 1001])
def test_partials_copy_is_the_binary_copy_of_its_columns(n: int) -> None:
    rng = np.random.default_rng(n)
    times = [rng.integers(-(2**62), 2**62, n, dtype=np.int64) for _ in range(3)]
    partials = Rollup(
        sensor=rng.integers(-(2**31), 2**31, n).astype(np.int32),
        bucket=times[0],
        min=rng.normal(size=n),
        max=np.full(n, np.inf),
        sum=rng.normal(size=n) * 1e300,
        count=rng.integers(0, 2**62, n, dtype=np.int64),
        first=np.full(n, -0.0),
        first_time=times[1],
        last=np.full(n, np.nan),
        last_time=times[2],
    )

    def field(width: int, value: int) -> bytes:
        return width.to_bytes(4, "big") + value.to_bytes(width, "big", signed=True)

    def real(x: float) -> bytes:
        return (8).to_bytes(4, "big") + struct.pack(">d", x)

    rows = []
    for i in range(n):
        p = [getattr(partials, f)[i].item() for f in PARTIAL_FIELDS]
        rows.append(
            b"".join(
                [
                    (10).to_bytes(2, "big"),
                    field(8, p[0] - PG_EPOCH_US),  # bucket
                    field(4, p[1]),  # sensor_id
                    real(p[2]),
                    real(p[3]),
                    real(p[4]),
                    field(8, p[5]),  # count
                    real(p[6]),
                    field(8, p[7] - PG_EPOCH_US),  # first_time
                    real(p[8]),
                    field(8, p[9] - PG_EPOCH_US),  # last_time
                ]
            )
        )
    expected = b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"".join(rows) + b"\xff\xff"
    assert bytes(partials_copy(partials)) == expected


# Rollup's fields in the order of rollup_pending's columns (PARTIAL_COLUMNS).
PARTIAL_FIELDS = ("bucket", "sensor", *ROLLUP_FIELDS[2:])
