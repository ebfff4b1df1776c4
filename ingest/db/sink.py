"""The sink stage: one binary COPY per flush into TimescaleDB, one transaction with its extras."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest.db.binary_copy import PG_EPOCH_US, Slices, copy_data, readings_copy
from ingest.db.dead_letters import DeadLetter, write_dead_letters
from ingest.errors import PermanentSinkError, TransientSinkError

log = logging.getLogger(__name__)

_READING_COLUMNS = ("time", "sensor_id", "value", "quality")

# SQLSTATE classes a retry can fix: connection exceptions, insufficient resources, operator
# intervention (shutdown, crash recovery), serialisation failures and deadlocks, lock timeouts.
_TRANSIENT_CLASSES = ("08", "53", "57", "40", "55P03", "58")


@dataclass(frozen=True, slots=True)
class Readings:
    """A slab of readings as columns, sorted by (sensor, time) with (sensor, time) unique."""

    time: npt.NDArray[np.int64]  # microseconds since the Unix epoch
    sensor: npt.NDArray[np.int32]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.time)

    def select(self, mask: npt.NDArray[np.bool_]) -> Readings:
        return Readings(self.time[mask], self.sensor[mask], self.value[mask], self.quality[mask])

    def rows(self, start: int, stop: int) -> Readings:
        """Rows `start` to `stop`, as views."""
        return Readings(
            self.time[start:stop],
            self.sensor[start:stop],
            self.value[start:stop],
            self.quality[start:stop],
        )


@dataclass(frozen=True, slots=True)
class Upsert:
    """Extra rows to write in the same transaction: `sql` takes one array parameter per column,
    then any scalar parameters (such as the bounds of a time range)."""

    sql: str
    columns: tuple[Any, ...]

    def __len__(self) -> int:
        return len(self.columns[0]) if self.columns else 0


@dataclass(frozen=True, slots=True)
class StagedUpsert:
    """Extra rows too many for array parameters: binary COPY data for a session temporary
    table (`stage`, created by `stage_ddl`, emptied at every commit), which `sql` then reads.

    asyncpg encodes an array parameter element by element, with an isinstance check against
    collections.abc each; COPY data is built from whole columns.
    """

    stage: str
    stage_ddl: str
    data: memoryview
    rows: int
    sql: str

    def __len__(self) -> int:
        return self.rows


APPENDABLE = ("rollup_pending", "rollup_journal")
"""Tables of the telemetry schema that an `Appended` may COPY rows into."""


@dataclass(frozen=True, slots=True)
class Appended:
    """Extra rows appended with one binary COPY straight into `telemetry.<table>`, a table of
    APPENDABLE: no statement per row, no upsert."""

    table: str
    columns: tuple[str, ...]
    data: memoryview
    rows: int

    def __post_init__(self) -> None:
        if self.table not in APPENDABLE:
            raise ValueError(f"Appended: telemetry.{self.table} is not appendable")

    def __len__(self) -> int:
        return self.rows


Extra = Upsert | StagedUpsert | Appended


class Extras(Protocol):
    """What a flush's `derive` step returns: extra writes for the same transaction."""

    @property
    def upserts(self) -> Sequence[Extra]: ...


D = TypeVar("D", bound=Extras)

Settle = Callable[[asyncpg.Connection, "Readings", D], Awaitable[D]]
"""A flush's second derive step, in its transaction once its new rows are written: takes the
connection, those rows and what `derive` returned; returns what to write."""


@dataclass(slots=True)
class WriteResult:
    """What one committed flush wrote."""

    inserted: int = 0
    duplicates: int = 0
    staged: bool = False
    copy_seconds: float = 0.0


def encode_copy(readings: Readings, *, positions: bool = False) -> memoryview:
    """Binary COPY data of `readings` (time, sensor_id, value, quality).

    With `positions`, each row also carries its index in the slab (the staging table's `pos`).
    """
    if not positions:
        return readings_copy(readings.time, readings.sensor, readings.value, readings.quality)
    columns: list[tuple[str, npt.NDArray[Any]]] = [
        (">i8", readings.time - PG_EPOCH_US),
        (">i4", readings.sensor),
        (">f8", readings.value),
        (">i2", readings.quality),
    ]
    if positions:
        columns.append((">i4", np.arange(len(readings), dtype=np.int32)))
    return copy_data(columns)


# Failures on the client side of a connection. InternalClientError: asyncpg read a message it
# did not expect (a restart's FATAL 57P01 arriving while idle) and the connection stays unusable.
CLIENT_ERRORS = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.InternalClientError)


def classify(exc: BaseException) -> TransientSinkError | PermanentSinkError:
    """Wrap a database error by SQLSTATE class (never by message text)."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", "") or ""
        if state.startswith(_TRANSIENT_CLASSES):
            return TransientSinkError(f"database: {exc} (SQLSTATE {state})")
        return PermanentSinkError(f"database: {exc} (SQLSTATE {state})")
    if isinstance(exc, CLIENT_ERRORS):
        return TransientSinkError(f"database connection: {exc or type(exc).__name__}")
    return PermanentSinkError(f"database: {exc}")


_STAGE_DDL = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS readings_stage "
    "(time timestamptz, sensor_id integer, value double precision, quality smallint, pos integer) "
    "ON COMMIT DELETE ROWS"
)
# The rows really inserted are learnt from the insert itself: a row that another ingester
# committed meanwhile is skipped by ON CONFLICT and not returned, so it is never rolled up twice.
_STAGE_INSERT = """
WITH inserted AS (
    INSERT INTO telemetry.readings (time, sensor_id, value, quality)
    SELECT time, sensor_id, value, quality FROM readings_stage ORDER BY pos
    ON CONFLICT DO NOTHING
    RETURNING sensor_id, time
)
SELECT coalesce(array_agg(s.pos), '{}')
  FROM inserted i JOIN readings_stage s ON s.sensor_id = i.sensor_id AND s.time = i.time
"""


class Sink:
    """Writes flushes on one connection. Called from one task only.

    Not connected until `connect` (which raises TransientSinkError while the database is
    unreachable, so the caller can retry); `close` or `discard` ends the connection.
    """

    def __init__(
        self,
        *,
        dsn: str,
        connect_timeout_s: float = 10.0,
        jit: bool = True,
        dead_letter_window_s: float = 86400.0,
    ) -> None:
        self._dsn = dsn
        # How far back a redelivered message's dead letter is looked for (see dead_letters).
        self._dead_letter_window_s = dead_letter_window_s
        self._timeout = connect_timeout_s
        # `jit=False` for flushes: their statements are short, and a plan over many chunks
        # costs enough to be compiled, which took seconds per statement (seen on 573 chunks).
        self._settings = {} if jit else {"jit": "off"}
        self._conn: asyncpg.Connection | None = None
        self._stages: set[str] = set()  # temporary tables the connection has

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    @property
    def connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            raise TransientSinkError("database connection: not connected")
        return self._conn

    async def connect(self) -> None:
        """(Re)connect; raises TransientSinkError, or PermanentSinkError (bad password, no db)."""
        await self.close()
        try:
            self._stages.clear()
            self._conn = await asyncpg.connect(
                self._dsn, timeout=self._timeout, server_settings=self._settings
            )
        except (
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError,
        ) as exc:
            raise PermanentSinkError(f"database: {exc}") from exc
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            raise classify(exc) from exc

    async def close(self, *, wait_s: float = 5.0) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=wait_s)
            except (asyncpg.PostgresError, *CLIENT_ERRORS):
                conn.terminate()

    def discard(self) -> None:
        """Drop the connection at once: after a client-side error its state is unknown."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    async def write(
        self,
        *,
        readings: Readings,
        dead_letters: Sequence[DeadLetter],
        derive: Callable[[Readings], D],
        settle: Settle[D] | None = None,
    ) -> tuple[WriteResult, D]:
        """Write one flush in one transaction and commit.

        The readings go in with one binary COPY; when that collides with rows already stored (a
        redelivery), the transaction is rolled back and written again with the slab going
        through a staging table, so that only new rows are inserted. `derive` returns the
        extra writes (`.upserts`: rollups, anomaly events) for the rows it is given, which
        commit in the same transaction; the one used is returned. On the COPY path it runs in a
        worker thread while the COPY is in flight, on the assumption that every row is new; on
        the staging path it is given exactly the new rows. It must not await, and must not
        change what another concurrent `write` uses. `settle`, if given, then runs in the
        transaction with the new rows written, and may read and lock before the extras go in.
        """
        conn = self.connection
        try:
            try:
                return await self._transaction(
                    conn, readings, dead_letters, derive, settle, staged=False
                )
            except asyncpg.UniqueViolationError:
                return await self._transaction(
                    conn, readings, dead_letters, derive, settle, staged=True
                )
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                self.discard()
            raise classify(exc) from exc

    async def _transaction(
        self,
        conn: asyncpg.Connection,
        readings: Readings,
        dead_letters: Sequence[DeadLetter],
        derive: Callable[[Readings], D],
        settle: Settle[D] | None,
        *,
        staged: bool,
    ) -> tuple[WriteResult, D]:
        result = WriteResult()
        created: list[str] = []
        async with conn.transaction():
            if staged:
                new = await self._stage_readings(conn, readings, result)
                extras = derive(new)
            else:
                new = readings
                speculative = asyncio.ensure_future(asyncio.to_thread(derive, readings))
                try:
                    await self._copy_readings(conn, readings, result)
                finally:
                    extras = await speculative  # never leave it running on failure
            if settle is not None:
                extras = await settle(conn, new, extras)
            for upsert in extras.upserts:
                if isinstance(upsert, Appended):
                    if upsert.rows:
                        await self._append(conn, upsert)
                elif isinstance(upsert, StagedUpsert):
                    if upsert.rows:
                        if upsert.stage not in self._stages:
                            await conn.execute(upsert.stage_ddl)
                            created.append(upsert.stage)
                        await conn.copy_to_table(
                            upsert.stage, source=cast(Any, Slices(upsert.data)), format="binary"
                        )
                        await conn.execute(upsert.sql)
                elif len(upsert):
                    await conn.execute(upsert.sql, *upsert.columns)
            await write_dead_letters(conn, dead_letters, window_s=self._dead_letter_window_s)
        self._stages.update(created)  # a rollback would have taken them away again
        return result, extras

    @staticmethod
    async def _append(conn: asyncpg.Connection, append: Appended) -> None:
        for table in APPENDABLE:  # the table's name is one of ours, never a computed one
            if table == append.table:
                await conn.copy_to_table(
                    table,
                    schema_name="telemetry",
                    source=cast(Any, Slices(append.data)),
                    columns=list(append.columns),
                    format="binary",
                )

    async def _copy_readings(
        self, conn: asyncpg.Connection, readings: Readings, result: WriteResult
    ) -> None:
        if not len(readings):
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await conn.copy_to_table(
                "readings",
                schema_name="telemetry",
                source=cast(Any, Slices(encode_copy(readings))),
                columns=list(_READING_COLUMNS),
                format="binary",
            )
        finally:
            result.copy_seconds = loop.time() - started
        result.inserted = len(readings)

    async def _stage_readings(
        self, conn: asyncpg.Connection, readings: Readings, result: WriteResult
    ) -> Readings:
        """Insert the rows not stored yet through the session's staging table; those rows."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        result.staged = True
        # The temporary table is created in the transaction, so a rollback takes it away too.
        await conn.execute(_STAGE_DDL)
        await conn.copy_to_table(
            "readings_stage",
            source=cast(Any, Slices(encode_copy(readings, positions=True))),
            columns=[*_READING_COLUMNS, "pos"],
            format="binary",
        )
        inserted = await conn.fetchval(_STAGE_INSERT)
        new = np.zeros(len(readings), dtype=bool)
        new[np.asarray(inserted, dtype=np.int64)] = True
        result.inserted = int(new.sum())
        result.duplicates = len(readings) - result.inserted
        result.copy_seconds = loop.time() - started
        return readings.select(new)
