"""A Sparkplug message's readings as columns: a birth's, DATA's (by alias, as read at intake, or
by name) and the stale rows of a death, filtered and counted as the stage stores them.

Functions of one message and the node's state; they never await and keep nothing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.db.registry import Registry, SensorKey
from ingest.errors import PayloadError
from ingest.sparkplug import values as sv
from ingest.sparkplug.aliases import AliasTable
from ingest.sparkplug.kernel import (
    C_ALIAS,
    C_DATATYPE,
    C_FIELD,
    C_FLAGS,
    C_PARENT,
    C_RAW,
    F_ALIAS,
    F_TRANSIENT,
)
from ingest.sparkplug.nodes import BirthMetric, NodeState
from ingest.sparkplug.topic import Topic
from ingest.sparkplug.wire import (
    DataReadings,
    Decoded,
    decode_data,
    metric_path,
    reading_columns,
)

__all__ = [
    "ANY_TIME",
    "NUMERIC",
    "Columns",
    "Item",
    "UnknownAliasError",
    "bd_seq",
    "birth_readings",
    "data_readings",
    "empty",
    "sensor_name",
    "stale_readings",
]

NUMERIC: Final = frozenset(range(1, 12))
"""The datatypes stored as readings."""
ANY_TIME: Final = (-(2**63), 2**63 - 1)
_NAN: Final = float("nan")
_EMPTY_TABLE: Final = AliasTable.empty()


@dataclass(frozen=True, slots=True)
class Item:
    """One accepted Sparkplug message of a flush."""

    index: int  # the message's place in the flush, for dead letters
    topic: Topic
    decoded: Decoded
    times: npt.NDArray[np.int64]  # of every metric; empty with `data`
    received_us: int
    data: DataReadings | None = None  # DATA read at intake with the node's table of then


@dataclass(frozen=True, slots=True)
class Columns:
    """Readings in arrival order (not sorted, may repeat a (sensor, time))."""

    time: npt.NDArray[np.int64]
    sensor: npt.NDArray[np.int32]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]


class UnknownAliasError(PayloadError):
    """DATA naming an alias the node's table does not have."""


def empty() -> Columns:
    return Columns(
        np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, np.float64), np.empty(0, np.uint8)
    )


def bd_seq(decoded: Decoded) -> int | None:
    """The value of a top-level metric named `bdSeq`, if any."""
    for row in np.flatnonzero(decoded.rows[:, C_PARENT] < 0).tolist():
        if decoded.rows[row, C_FIELD] in (10, 11) and decoded.name(row) == "bdSeq":
            return int(decoded.rows[row, C_RAW])
    return None


def sensor_name(item: Item, state: NodeState | None, row: int) -> str | None:
    """The sensor name of a metric row: its name, else (in DATA) its alias's, with the names of
    the template instances it is a member of in front (`instance/member`)."""
    decoded = item.decoded
    rows = decoded.rows
    own = decoded.name(row)
    if own is None and rows[row, C_FLAGS] & F_ALIAS and state is not None:
        own = state.names.get(int(rows[row, C_ALIAS]))
    parent = int(rows[row, C_PARENT])
    if own is None or parent < 0:
        return own
    above = sensor_name(item, state, parent)
    return None if above is None else f"{above}/{own}"


def birth_readings(
    item: Item, registry: Registry, *, store_transient: bool, skipped: Counter[str]
) -> tuple[Columns, tuple[BirthMetric, ...]]:
    """A birth's readings, and its metrics as the node's state keeps them."""
    decoded, topic = item.decoded, item.topic
    rows = decoded.rows
    metrics: list[BirthMetric] = []
    sensors = np.full(len(decoded), -1, np.int32)
    for row in range(len(decoded)):
        name = decoded.full_name(row)
        if not name:
            continue
        datatype = min(int(rows[row, C_DATATYPE]), 32767)  # a smallint; >34 is unknown
        sensor = registry.get(SensorKey(topic.levels, name)) if datatype in NUMERIC else None
        if sensor is not None:
            sensors[row] = sensor
        alias = int(rows[row, C_ALIAS]) if rows[row, C_FLAGS] & F_ALIAS else None
        metrics.append(BirthMetric(name, alias, sensor, datatype))
    value, status, _, _, quality = sv.metric_columns(rows)
    columns = _kept(item, sensors, value, status, quality, store_transient, skipped)
    return columns, tuple(metrics)


def data_readings(
    item: Item,
    state: NodeState | None,
    registry: Registry,
    *,
    store_transient: bool,
    skipped: Counter[str],
) -> Columns:
    """DATA's readings through the node's aliases; UnknownAliasError for an alias they lack."""
    if item.data is not None:
        return _read_data(item, item.data, state, store_transient, skipped)
    decoded, topic = item.decoded, item.topic
    rows = decoded.rows
    aliased = (rows[:, C_FLAGS] & F_ALIAS) != 0
    table = state.table if state is not None else _EMPTY_TABLE
    value, status, sensors, known, quality = sv.metric_columns(rows, table=table)
    missing = np.flatnonzero(aliased & ~known)
    if len(missing):
        raise _unknown(item, int(missing[0]))
    if not aliased.all():
        for row in np.flatnonzero(~aliased).tolist():  # data sent by name
            name = sensor_name(item, state, row)
            sensor = registry.get(SensorKey(topic.levels, name)) if name else None
            sensors[row] = -1 if sensor is None else sensor
    return _kept(item, sensors, value, status, quality, store_transient, skipped)


def stale_readings(at: int, sensors: list[int]) -> Columns:
    """One row of quality stale and value NaN at `at` per sensor, as deaths write them."""
    n = len(sensors)
    return Columns(
        np.full(n, at, np.int64),
        np.array(sensors, np.int32),
        np.full(n, _NAN),
        np.full(n, sv.STALE, np.uint8),
    )


def _read_data(
    item: Item,
    data: DataReadings,
    state: NodeState | None,
    store_transient: bool,
    skipped: Counter[str],
) -> Columns:
    """DATA that `accept` read already: read again only if the node's table changed since
    (a birth earlier in the flush, or one another instance wrote)."""
    table = state.table if state is not None else _EMPTY_TABLE
    if data.table is not table:
        again = decode_data(
            data.decoded.payload,
            table,
            max_metrics=len(data.decoded) + 1,
            received_us=item.received_us,
            window=ANY_TIME,
            store_transient=store_transient,
        )
        if again is None:  # not expected: the same payload was read at intake
            raise PayloadError("payload: could not be read again with the new aliases")
        data = again
    info = data.info
    unknown = int(info[sv.I_UNKNOWN])
    if unknown >= 0:
        raise _unknown(item, unknown)
    for slot, why in (
        (sv.I_NULL, "null"),
        (sv.I_NONNUMERIC, "nonnumeric"),
        (sv.I_NOVALUE, "novalue"),
        (sv.I_TRANSIENT, "transient"),
    ):
        count = int(info[slot])
        if count:
            skipped[why] += count
    return Columns(*reading_columns(data.readings))


def _kept(
    item: Item,
    sensors: npt.NDArray[np.int32],
    value: npt.NDArray[np.float64],
    status: npt.NDArray[np.uint8],
    quality: npt.NDArray[np.uint8],
    store_transient: bool,
    skipped: Counter[str],
) -> Columns:
    """The readings stored of a message's metrics: a value, a sensor, and not transient unless
    configured; the others counted by why."""
    rows = item.decoded.rows
    keep = (status == sv.OK) & (sensors >= 0)
    for code, why in ((sv.NULL, "null"), (sv.NONNUMERIC, "nonnumeric"), (sv.NOVALUE, "novalue")):
        count = int(np.count_nonzero(status == code))
        if count:
            skipped[why] += count
    if not store_transient:
        transient = keep & ((rows[:, C_FLAGS] & F_TRANSIENT) != 0)
        if transient.any():
            skipped["transient"] += int(transient.sum())
            keep &= ~transient
    return Columns(item.times[keep], sensors[keep], value[keep], quality[keep])


def _unknown(item: Item, row: int) -> UnknownAliasError:
    rows = item.decoded.rows
    alias = int(rows[row, C_ALIAS]) % 2**64
    return UnknownAliasError(
        f"{metric_path(rows, row)}.alias: {alias} is not defined by a birth of edge node "
        f"{item.topic.node!r}"
    )
