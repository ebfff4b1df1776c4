"""The one-call DATA path (wire.decode_data) against the general one it stands in for."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.errors import PayloadError
from ingest.sparkplug import values as sv
from ingest.sparkplug.aliases import AliasTable
from ingest.sparkplug.kernel import C_ALIAS, C_FLAGS, C_NAME_START, F_ALIAS, F_TRANSIENT
from ingest.sparkplug.wire import DataReadings, decode_data, decode_payload
from tests.support.sparkplug import METRIC, U64, fill_metric, new_payload, valid_payload

ANY = (-(2**63), 2**63 - 1)
TABLE = AliasTable.build(
    aliases=np.array([0, 1, 2, 3, 5, 2**63 + 1 - 2**64], np.int64),
    sensors=np.array([10, 11, 12, 13, 15, 16], np.int32),
    datatypes=np.array([10, 3, 0, 11, 2, 9], np.int64),
)


def _general(
    data: bytes, table: AliasTable, window: tuple[int, int], received_us: int, transient: bool
) -> tuple[Any, ...] | None:
    """What decode_payload, metric_times and metric_columns make of a payload, filtered as the
    stage filters DATA; None where decode_data must say None."""
    try:
        decoded = decode_payload(data, max_metrics=1000)
    except PayloadError:
        return None
    rows = decoded.rows
    times = sv.metric_times(rows, payload_ms=decoded.timestamp, received_us=received_us)
    lo, hi = window
    if decoded.timestamp is not None and not lo <= decoded.timestamp * 1000 <= hi:
        return None
    if np.any((times < lo) | (times > hi)) or np.any(rows[:, C_NAME_START] >= 0):
        return None
    value, status, sensor, known, quality = sv.metric_columns(rows, table=table)
    aliased = (rows[:, C_FLAGS] & F_ALIAS) != 0
    missing = np.flatnonzero(aliased & ~known)
    unknown = int(missing[0]) if len(missing) else -1
    counted = ~(aliased & ~known)
    counts = [int(np.count_nonzero(counted & (status == c))) for c in (sv.NULL, sv.NONNUMERIC)]
    counts.append(int(np.count_nonzero(counted & (status == sv.NOVALUE))))
    keep = (status == sv.OK) & (sensor >= 0)
    is_transient = keep & ((rows[:, C_FLAGS] & F_TRANSIENT) != 0)
    if not transient:
        keep &= ~is_transient
    counts.append(0 if transient else int(is_transient.sum()))
    return (
        decoded.timestamp,
        decoded.seq,
        unknown,
        counts,
        times[keep],
        sensor[keep],
        value[keep],
        quality[keep],
    )


def _same(
    data: bytes, window: tuple[int, int] = ANY, received_us: int = 7, transient: bool = False
) -> DataReadings | None:
    got = decode_data(
        data,
        TABLE,
        max_metrics=1000,
        received_us=received_us,
        window=window,
        store_transient=transient,
    )
    want = _general(data, TABLE, window, received_us, transient)
    if got is None:
        # only the general path's cases, or more metrics than the first guess of room holds
        assert want is None or len(decode_payload(data, max_metrics=1000)) > len(data) // 12 + 16
        return None
    assert want is not None
    ts, seq, unknown, counts, time, sensor, value, quality = want
    assert (got.decoded.timestamp, got.decoded.seq) == (ts, seq)
    assert int(got.info[sv.I_UNKNOWN]) == unknown
    np.testing.assert_array_equal(got.decoded.rows, decode_payload(data, max_metrics=1000).rows)
    if unknown >= 0:  # the stage refuses the payload: the rest is not used
        return got
    assert [
        int(got.info[i]) for i in (sv.I_NULL, sv.I_NONNUMERIC, sv.I_NOVALUE, sv.I_TRANSIENT)
    ] == counts
    np.testing.assert_array_equal(got.time, time)
    np.testing.assert_array_equal(got.sensor, sensor)
    np.testing.assert_array_equal(got.value, value)  # NaN where NaN
    np.testing.assert_array_equal(got.quality, quality)
    dtypes = [got.time.dtype, got.sensor.dtype, got.value.dtype, got.quality.dtype]
    assert dtypes == [
        np.dtype(np.int64),
        np.dtype(np.int32),
        np.dtype(np.float64),
        np.dtype(np.uint8),
    ]
    return got


ALIASED = METRIC.map(lambda spec: {k: v for k, v in spec.items() if k != "name"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    timestamp=st.none() | U64,
    seq=st.none() | st.integers(0, 255),
    metrics=st.lists(ALIASED, max_size=12),
    aliases=st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 2**63 + 1]), max_size=12),
    window=st.sampled_from([ANY, (0, 2**62), (1_767_225_600_000_000, 1_767_225_700_000_000)]),
    transient=st.booleans(),
)
def test_data_path_agrees_with_the_general_one(
    timestamp: int | None,
    seq: int | None,
    metrics: list[dict[str, Any]],
    aliases: list[int],
    window: tuple[int, int],
    transient: bool,
) -> None:
    payload = new_payload()
    if timestamp is not None:
        payload.timestamp = timestamp
    if seq is not None:
        payload.seq = seq
    for i, spec in enumerate(metrics):
        if i < len(aliases):
            spec = {**spec, "alias": aliases[i]}
        fill_metric(payload.metrics.add(), spec)
    _same(payload.SerializeToString(), window, transient=transient)


def test_plain_aliased_data_is_read_through_the_table() -> None:
    payload = new_payload()
    payload.timestamp = 1_767_225_600_000
    for alias, field, value in (
        (0, "double_value", 2.5),
        (1, "int_value", 2**32 - 12),
        (3, "boolean_value", True),
    ):
        m = payload.metrics.add()
        m.alias = alias
        setattr(m, field, value)
    m = payload.metrics.add()
    m.alias = 5
    m.is_null = True
    got = _same(payload.SerializeToString())
    assert got is not None
    assert got.sensor.tolist() == [10, 11, 13]
    assert got.value.tolist() == [2.5, -12.0, 1.0]
    assert got.time.tolist() == [1_767_225_600_000_000] * 3
    assert int(got.info[sv.I_NULL]) == 1


def test_names_and_templates_take_the_general_path() -> None:
    assert (
        decode_data(
            valid_payload(), TABLE, max_metrics=10, received_us=0, window=ANY, store_transient=False
        )
        is None
    )


def test_unknown_alias_is_reported_with_its_row() -> None:
    payload = new_payload()
    payload.metrics.add().alias = 0
    payload.metrics.add().alias = 99
    got = _same(payload.SerializeToString())
    assert got is not None
    assert int(got.info[sv.I_UNKNOWN]) == 1
    assert int(got.decoded.rows[1, C_ALIAS]) == 99


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mangled_data_is_none_or_agrees(data: st.DataObject) -> None:
    payload = new_payload()
    payload.timestamp = 1_767_225_600_000
    for i in range(4):
        m = payload.metrics.add()
        m.alias = i
        m.double_value = i / 3
        fill_metric(m, {"quality": 500})
    valid = payload.SerializeToString()
    cut = data.draw(st.integers(0, len(valid)))
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    if kind == "truncate":
        mangled = valid[:cut]
    elif kind == "flip":
        buf = bytearray(valid)
        buf[min(cut, len(buf) - 1)] ^= data.draw(st.integers(1, 255))
        mangled = bytes(buf)
    else:
        mangled = valid[:cut] + data.draw(st.binary(min_size=1, max_size=12)) + valid[cut:]
    _same(mangled)


@given(st.binary(max_size=200))
@settings(max_examples=400, deadline=None)
def test_random_bytes_never_crash(data: bytes) -> None:
    _same(data)


def test_ten_byte_varints_and_unknown_fields() -> None:
    alias = b"\x10" + b"\xff" * 9 + b"\x01"  # alias 2^64 - 1 in 10 bytes: unknown
    unknown = b"\xa8\x01\x05"  # metric field 21, a varint: skipped
    metric = alias + b"\x69" + np.float64(2.5).tobytes() + unknown
    data = b"\x12" + bytes([len(metric)]) + metric + b"\x82\x01\x03abc"  # payload field 16
    got = _same(data)
    assert got is not None
    assert int(got.info[sv.I_UNKNOWN]) == 0
    known = b"\x10\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00"  # alias 0 in 10 bytes
    metric = known + b"\x69" + np.float64(2.5).tobytes() + unknown
    got = _same(b"\x12" + bytes([len(metric)]) + metric)
    assert got is not None
    assert (got.sensor.tolist(), got.value.tolist()) == ([10], [2.5])
    assert _same(b"\x12\x0b\x10" + b"\xff" * 10) is None  # an 11-byte varint
