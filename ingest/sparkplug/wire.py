"""Sparkplug B payloads into per-metric columns, and specific reasons for broken ones.

The numba kernel (`kernel`) fills one int64 matrix, one row per metric, with no Python object
per metric; names stay as byte ranges of the payload until somebody asks for them (births do,
aliased data does not). Its error codes become PayloadErrors naming metric, field and byte.
"""

from __future__ import annotations

from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.errors import PayloadError
from ingest.sparkplug.aliases import AliasTable
from ingest.sparkplug.kernel import (
    C_NAME_LEN,
    C_NAME_START,
    C_PARENT,
    COLUMNS,
    E_BAD_WIRE_TYPE,
    E_FIELD_ZERO,
    E_FULL,
    E_LONG_VARINT,
    E_NESTING,
    E_PAST_END,
    E_TOO_MANY,
    E_TRUNCATED_VARINT,
    E_WIRE_TYPE,
    K_METRIC,
    K_PAYLOAD,
    K_PROPSET,
    K_PROPVALUE,
    K_TEMPLATE,
    METRIC_WT,
    PAYLOAD_WT,
    PROPSET_WT,
    PROPVALUE_WT,
    TEMPLATE_WT,
    decode,
)
from ingest.sparkplug.values import DATA_COLUMNS, I_SLOW, INFO, data_columns

__all__ = [
    "DataReadings",
    "Decoded",
    "decode_data",
    "decode_payload",
    "metric_path",
    "reading_columns",
]

_WHAT: Final = {
    E_TRUNCATED_VARINT: "varint runs past the end",
    E_LONG_VARINT: "varint longer than 10 bytes",
    E_PAST_END: "length runs past the end of its message",
    E_WIRE_TYPE: "wrong wire type",
    E_BAD_WIRE_TYPE: "unsupported wire type (groups or 6/7)",
    E_FIELD_ZERO: "field number 0",
}

_METRIC_FIELDS: Final = (
    "name",
    "alias",
    "timestamp",
    "datatype",
    "is_historical",
    "is_transient",
    "is_null",
    "metadata",
    "properties",
    "int_value",
    "long_value",
    "float_value",
    "double_value",
    "boolean_value",
    "string_value",
    "bytes_value",
    "dataset_value",
    "template_value",
    "extension_value",
)
_FIELDS: Final = (
    {1: "timestamp", 2: "metrics", 3: "seq", 4: "uuid", 5: "body"},
    dict(enumerate(_METRIC_FIELDS, 1)),
    {1: "version", 2: "metrics", 3: "parameters", 4: "template_ref", 5: "is_definition"},
    {1: "keys", 2: "values"},
    {1: "type", 2: "is_null", 3: "int_value", 4: "long_value"},
)
_PREFIX: Final = ("", "", "", "properties.", "properties.values.")
_WIRE_NAMES: Final = (
    "varint",
    "fixed64",
    "length-delimited",
    "group start",
    "group end",
    "fixed32",
    "wire type 6",
    "wire type 7",
)


class Decoded(msgspec.Struct, frozen=True):
    """One Sparkplug payload as columns: `rows` has one row per metric (see the C_* columns);
    template members follow their template metric and name it in C_PARENT. (A Struct: made
    for every message, and quicker to make than a frozen dataclass.)"""

    payload: bytes
    timestamp: int | None  # ms since the epoch
    seq: int | None
    rows: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def name(self, row: int) -> str | None:
        """The metric's own name (a template member's without its instance), or None."""
        start = int(self.rows[row, C_NAME_START])
        if start < 0:
            return None
        raw = self.payload[start : start + int(self.rows[row, C_NAME_LEN])]
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise PayloadError(f"{metric_path(self.rows, row)}.name: is not UTF-8") from None

    def full_name(self, row: int) -> str | None:
        """The sensor name: a template member's is `instance/member` (nested ones joined too)."""
        own = self.name(row)
        parent = int(self.rows[row, C_PARENT])
        if own is None or parent < 0:
            return own
        above = self.full_name(parent)
        return None if above is None else f"{above}/{own}"


def metric_path(rows: npt.NDArray[np.int64], row: int) -> str:
    """`metrics[3]`, or `metrics[1].template.metrics[0]` for a member, for error reasons."""
    parent = int(rows[row, C_PARENT])
    index = int(np.count_nonzero(rows[:row, C_PARENT] == parent))
    prefix = "" if parent < 0 else metric_path(rows, parent) + ".template."
    return f"{prefix}metrics[{index}]"


def _error(
    rows: npt.NDArray[np.int64], head: npt.NDArray[np.int64], *, max_metrics: int, max_depth: int
) -> PayloadError:
    code, at, row, field, wire, kind = (int(x) for x in head[4:10])
    if code == E_TOO_MANY:
        return PayloadError(f"metrics: more than {max_metrics} metrics")
    where = metric_path(rows, row) if row >= 0 else ""
    if code == E_NESTING:
        return PayloadError(f"{where}: templates nested deeper than {max_depth} levels")
    if kind == K_TEMPLATE:
        where += ".template"
    name = _FIELDS[kind].get(field)
    if code != E_FIELD_ZERO and field:
        where += ("." if where else "") + _PREFIX[kind] + (name or f"field {field}")
    what = _WHAT[code]
    if code == E_WIRE_TYPE:
        expected = {
            K_PAYLOAD: PAYLOAD_WT,
            K_METRIC: METRIC_WT,
            K_TEMPLATE: TEMPLATE_WT,
            K_PROPSET: PROPSET_WT,
            K_PROPVALUE: PROPVALUE_WT,
        }[kind][field]
        what = f"wire type {_WIRE_NAMES[wire]} where {_WIRE_NAMES[expected]} is expected"
    return PayloadError(f"{where or 'payload'}: {what} at byte {at}")


def decode_payload(payload: bytes, *, max_metrics: int, max_depth: int = 8) -> Decoded:
    """Decode a Sparkplug B Payload into columns. Pure; never awaits; releases no GIL state.

    Raises PayloadError naming the metric, the problem and the byte offset for a malformed
    payload, more than `max_metrics` metrics (template members included) or templates nested
    deeper than `max_depth`.
    """
    # A metric takes at least 2 bytes, usually more than 12: guess, and if the guess was too
    # small decode again with room for the most the payload can hold.
    size = len(payload)
    rows = np.empty((min(size // 12 + 16, max_metrics + 1), COLUMNS), np.int64)
    work = np.empty((16, 4), np.int64)
    n, head = decode(payload, max_metrics, max_depth, rows, work)
    if head[4] == E_FULL:
        most = min(size // 2 + 1, max_metrics + 1)
        rows = np.empty((most, COLUMNS), np.int64)
        work = np.empty((most + 1, 4), np.int64)
        n, head = decode(payload, max_metrics, max_depth, rows, work)
    code = int(head[4])
    if code:
        raise _error(rows[: n + 1], head, max_metrics=max_metrics, max_depth=max_depth)
    return Decoded(
        payload=payload,
        timestamp=int(head[0]) % 2**64 if head[1] else None,
        seq=int(head[2]) % 2**64 if head[3] else None,
        rows=rows[:n],
    )


class DataReadings(msgspec.Struct, frozen=True):
    """A DATA payload's readings as `decode_data` returns them, kept ones only (in metric
    order): `readings` holds time, sensor, the value's float64 bits and quality as the
    columns of one int64 array (`reading_columns` and the properties read them), `info` the
    skip counts and the first unknown alias (values.I_*), `table` is the alias table they
    were read with."""

    decoded: Decoded
    table: AliasTable
    info: npt.NDArray[np.int64]
    readings: npt.NDArray[np.int64]  # (readings, 4): time, sensor, value bits, quality

    @property
    def time(self) -> npt.NDArray[np.int64]:
        return np.ascontiguousarray(self.readings[:, 0])

    @property
    def sensor(self) -> npt.NDArray[np.int32]:
        return self.readings[:, 1].astype(np.int32)

    @property
    def value(self) -> npt.NDArray[np.float64]:
        return np.ascontiguousarray(self.readings[:, 2]).view(np.float64)

    @property
    def quality(self) -> npt.NDArray[np.uint8]:
        return self.readings[:, 3].astype(np.uint8)


def reading_columns(
    readings: npt.NDArray[np.int64],
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int32], npt.NDArray[np.float64], npt.NDArray[np.uint8]
]:
    """(time, sensor, value, quality) of readings in `DataReadings.readings`'s form."""
    return (
        np.ascontiguousarray(readings[:, 0]),
        readings[:, 1].astype(np.int32),
        np.ascontiguousarray(readings[:, 2]).view(np.float64),
        readings[:, 3].astype(np.uint8),
    )


def decode_data(
    payload: bytes,
    table: AliasTable,
    *,
    max_metrics: int,
    received_us: int,
    window: tuple[int, int],
    store_transient: bool,
    max_depth: int = 8,
) -> DataReadings | None:
    """Decode a DATA payload and read its aliased metrics through `table`, in one kernel call.

    None where the general path (decode_payload, metric_times, metric_columns) must take over:
    a malformed payload (it raises the precise PayloadError), a time outside `window`, a metric
    with a name, or more metrics than the first guess of room holds. One array holds the
    metric rows and the readings: every array made here costs about as much as decoding a
    dozen metrics."""
    rows = np.empty((min(len(payload) // 12 + 16, max_metrics + 1), DATA_COLUMNS), np.int64)
    info = np.empty(INFO, np.int64)
    k = data_columns(
        payload,  # numba reads bytes as they are: no array to make
        max_metrics,
        max_depth,
        rows,
        info,
        table.columns,
        received_us,
        window[0],
        window[1],
        store_transient,
    )
    # the slots I_TIMESTAMP, I_HAS_TIMESTAMP, I_SEQ, I_HAS_SEQ, I_ROWS, I_READINGS, I_SLOW
    ts, has_ts, seq, has_seq, n, _, slow = info[: I_SLOW + 1].tolist()
    if slow:
        return None
    decoded = Decoded(
        payload,
        ts % 2**64 if has_ts else None,
        seq % 2**64 if has_seq else None,
        rows[:n, :COLUMNS],
    )
    return DataReadings(decoded, table, info, rows[:k, COLUMNS:])
