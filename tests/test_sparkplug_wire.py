"""The Sparkplug decoder against upb: payloads encoded from the official schema."""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.errors import PayloadError
from ingest.sparkplug import values as sv
from ingest.sparkplug.kernel import (
    C_ALIAS,
    C_DATATYPE,
    C_FLAGS,
    C_QUALITY,
    C_TIMESTAMP,
    F_ALIAS,
    F_DATATYPE,
    F_HISTORICAL,
    F_NULL,
    F_TIMESTAMP,
    F_TRANSIENT,
)
from ingest.sparkplug.wire import decode_payload
from tests.support.sparkplug import (
    METRIC,
    U64,
    fill_metric,
    new_payload,
    payload_class,
    valid_payload,
)

VALUE_FIELDS = ("int_value", "long_value", "float_value", "double_value", "boolean_value")


def _expected_value(metric: Any, datatype: int) -> tuple[float, int]:
    """What the README promises for one metric, computed from upb's parse."""
    if metric.is_null:
        return 0.0, sv.NULL
    field = metric.WhichOneof("value")
    if field is None:
        return 0.0, sv.NOVALUE
    if field not in VALUE_FIELDS:
        return 0.0, sv.NONNUMERIC
    value = getattr(metric, field)
    if datatype == 0:
        datatype = {"int_value": 7, "long_value": 8, "float_value": 9, "double_value": 10}.get(
            field, 11
        )
    if field in ("float_value", "double_value"):
        if 1 <= datatype <= 10:
            return float(value), sv.OK
        if datatype == 11:
            return float(value != 0), sv.OK
        return 0.0, sv.NONNUMERIC
    value = int(value)
    widths = {1: 8, 2: 16, 3: 32, 5: 8, 6: 16, 7: 32}
    if datatype in widths:
        bits = widths[datatype]
        masked = value & ((1 << bits) - 1)
        if datatype <= 3 and masked >= 1 << (bits - 1):
            masked -= 1 << bits
        return float(masked), sv.OK
    if datatype == 4:
        return float(value - (1 << 64) if value >= 1 << 63 else value), sv.OK
    if datatype in (8, 9, 10):
        return float(value), sv.OK
    if datatype == 11:
        return float(value != 0), sv.OK
    return 0.0, sv.NONNUMERIC


def _flatten(metrics: Any, prefix: str | None = None) -> list[tuple[Any, str | None]]:
    """Metrics in the decoder's order: each message's metrics, then its templates' members."""
    out: list[tuple[Any, str | None]] = []
    queue: list[tuple[Any, str | None]] = [(metrics, prefix)]
    while queue:
        group, above = queue.pop(0)
        for m in group:
            name = m.name if m.HasField("name") else None
            full = name if above is None or name is None else f"{above}/{name}"
            if prefix is not None and above is None:
                full = None
            out.append((m, full))
            if m.WhichOneof("value") == "template_value":
                queue.append((m.template_value.metrics, full if full is not None else "\0"))
    return out


def _compare(data: bytes) -> None:
    parsed = payload_class().FromString(data)
    decoded = decode_payload(data, max_metrics=10_000)
    assert decoded.timestamp == (parsed.timestamp if parsed.HasField("timestamp") else None)
    assert decoded.seq == (parsed.seq if parsed.HasField("seq") else None)
    flat = _flatten(parsed.metrics)
    assert len(decoded) == len(flat)
    rows = decoded.rows
    datatypes = rows[:, C_DATATYPE]
    got_value, got_status = sv.metric_values(rows, datatypes)
    qualities = sv.metric_columns(rows)[4]
    for i, (m, full) in enumerate(flat):
        row = rows[i]
        flags = int(row[C_FLAGS])
        if full is not None and "\0" not in full:
            assert decoded.full_name(i) == full
        assert decoded.name(i) == (m.name if m.HasField("name") else None)
        assert bool(flags & F_ALIAS) == m.HasField("alias")
        if m.HasField("alias"):
            assert int(row[C_ALIAS]) & (2**64 - 1) == m.alias
        assert bool(flags & F_TIMESTAMP) == m.HasField("timestamp")
        if m.HasField("timestamp"):
            assert int(row[C_TIMESTAMP]) & (2**64 - 1) == m.timestamp
        assert bool(flags & F_DATATYPE) == m.HasField("datatype")
        assert int(row[C_DATATYPE]) == m.datatype
        assert bool(flags & F_HISTORICAL) == m.is_historical
        assert bool(flags & F_TRANSIENT) == m.is_transient
        assert bool(flags & F_NULL) == m.is_null
        quality = -1
        if "Quality" in m.properties.keys:
            quality = m.properties.values[list(m.properties.keys).index("Quality")].int_value
        assert int(row[C_QUALITY]) == quality
        want_q = {-1: 0, 192: 0, 0: 1, 500: 2}.get(quality, 3)
        assert int(qualities[i]) == want_q
        value, status = _expected_value(m, m.datatype)
        assert int(got_status[i]) == status, (m, status)
        if status == sv.OK:
            assert got_value[i] == value or (math.isnan(value) and math.isnan(got_value[i]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    timestamp=st.none() | U64,
    seq=st.none() | st.integers(0, 255),
    metrics=st.lists(METRIC, max_size=12),
    members=st.lists(METRIC, max_size=4),
    unknown=st.binary(max_size=0) | st.just(b"\x78\x05") | st.just(b"\x82\x01\x03abc"),
)
def test_random_payloads_decode_like_upb(
    timestamp: int | None,
    seq: int | None,
    metrics: list[dict[str, Any]],
    members: list[dict[str, Any]],
    unknown: bytes,
) -> None:
    payload = new_payload()
    if timestamp is not None:
        payload.timestamp = timestamp
    if seq is not None:
        payload.seq = seq
    for spec in metrics:
        fill_metric(payload.metrics.add(), spec)
    if members:
        template = payload.metrics.add()
        template.name = "line1"
        template.datatype = 19
        template.template_value.template_ref = "Motor"
        for spec in members:
            fill_metric(template.template_value.metrics.add(), spec)
    _compare(payload.SerializeToString() + unknown)  # unknown fields 15 / 16: skipped


def test_signed_integers_of_every_width() -> None:
    """Sign-extended (what many encoders send) and masked encodings read the same."""
    payload = new_payload()
    cases = [
        (1, "int_value", 2**32 - 12, -12),
        (1, "int_value", 256 - 12, -12),
        (2, "int_value", 2**32 - 1200, -1200),
        (2, "int_value", 2**16 - 1200, -1200),
        (3, "int_value", 2**32 - 12, -12),
        (3, "long_value", 2**64 - 12, -12),
        (4, "long_value", 2**64 - 12, -12),
        (4, "long_value", 2**63 - 1, float(2**63 - 1)),
        (5, "int_value", 255, 255),
        (6, "int_value", 65535, 65535),
        (7, "long_value", 2**32 - 1, 2**32 - 1),
        (8, "long_value", 2**64 - 1, float(2**64 - 1)),
        (11, "boolean_value", True, 1),
        (9, "float_value", 1.5, 1.5),
        (10, "double_value", -2.25, -2.25),
    ]
    for datatype, field, raw, _ in cases:
        m = payload.metrics.add()
        m.datatype = datatype
        setattr(m, field, raw)
    decoded = decode_payload(payload.SerializeToString(), max_metrics=100)
    value, status = sv.metric_values(decoded.rows, decoded.rows[:, C_DATATYPE])
    assert list(status) == [sv.OK] * len(cases)
    assert list(value) == [float(c[3]) for c in cases]


def test_quality_property_maps_to_our_codes() -> None:
    payload = new_payload()
    for quality in (192, 0, 500, 7):
        fill_metric(payload.metrics.add(), {"quality": quality, "value": ("double_value", 1.0)})
    payload.metrics.add().double_value = 2.0
    decoded = decode_payload(payload.SerializeToString(), max_metrics=100)
    assert list(sv.metric_columns(decoded.rows)[4]) == [
        sv.GOOD,
        sv.BAD,
        sv.STALE,
        sv.UNCERTAIN,
        sv.GOOD,
    ]


def test_times_fall_back_to_the_payload_then_the_receive_time() -> None:
    payload = new_payload()
    payload.metrics.add().timestamp = 1_767_225_600_123
    payload.metrics.add()
    decoded = decode_payload(payload.SerializeToString(), max_metrics=100)
    times = sv.metric_times(decoded.rows, payload_ms=None, received_us=42)
    assert list(times) == [1_767_225_600_123_000, 42]
    times = sv.metric_times(decoded.rows, payload_ms=1_767_225_600_000, received_us=42)
    assert list(times) == [1_767_225_600_123_000, 1_767_225_600_000_000]


# ---------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x08" + b"\xff" * 10 + b"\x01", "timestamp: varint longer than 10 bytes at byte 0"),
        (b"\x08\xff", "timestamp: varint runs past the end at byte 0"),
        (b"\x12\x05\x08", "metrics: length runs past the end of its message at byte 0"),
        (b"\x0a\x00", "timestamp: wire type length-delimited where varint is expected at byte 0"),
        (
            b"\x12\x02\x08\x00",
            "metrics[0].name: wire type varint where length-delimited is expected at byte 2",
        ),
        (
            b"\x12\x05\x6d\x00\x00\x00\x00",
            "metrics[0].double_value: wire type fixed32 where fixed64 is expected at byte 2",
        ),
        (
            b"\x12\x02\xa3\x01",
            "metrics[0].field 20: unsupported wire type (groups or 6/7) at byte 2",
        ),
        (b"\x4b", "field 9: unsupported wire type (groups or 6/7) at byte 0"),
        (b"\x00\x00", "payload: field number 0 at byte 0"),
        (
            b"\x12\x04\x4a\x02\x0a\xff",
            "metrics[0].properties.keys: varint runs past the end at byte 4",
        ),
    ],
)
def test_hostile_payloads_have_specific_reasons(data: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as caught:
        decode_payload(data, max_metrics=100)
    assert caught.value.reason == reason


def test_deep_template_nesting_is_refused() -> None:
    inner = b""
    for _ in range(40):
        metric = b"\x92\x01" + bytes([len(inner)]) + inner if len(inner) < 128 else b""
        inner = b"\x12" + bytes([len(metric)]) + metric  # Template.metrics = [metric]
        if len(inner) > 120:
            break
    data = b"\x12" + bytes([len(inner) - 2]) + inner[2:]
    with pytest.raises(PayloadError, match="templates nested deeper than 3 levels"):
        decode_payload(data, max_metrics=100, max_depth=3)


def test_too_many_metrics_is_refused() -> None:
    with pytest.raises(PayloadError, match="metrics: more than 2 metrics"):
        decode_payload(b"\x12\x00" * 3, max_metrics=2)


def test_empty_payload_has_no_metrics() -> None:
    decoded = decode_payload(b"", max_metrics=2)
    assert (decoded.timestamp, decoded.seq, len(decoded)) == (None, None, 0)


def test_names_must_be_utf8() -> None:
    decoded = decode_payload(b"\x12\x03\x0a\x01\xff", max_metrics=2)
    with pytest.raises(PayloadError, match=r"metrics\[0\].name: is not UTF-8"):
        decoded.name(0)


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_mangled_payloads_are_payload_errors_or_agree_with_upb(data: st.DataObject) -> None:
    valid = valid_payload()
    cut = data.draw(st.integers(0, len(valid)))
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    if kind == "truncate":
        mangled = valid[:cut]
    elif kind == "flip":
        flipped = bytearray(valid)
        if flipped:
            flipped[min(cut, len(flipped) - 1)] ^= data.draw(st.integers(1, 255))
        mangled = bytes(flipped)
    else:
        mangled = valid[:cut] + data.draw(st.binary(min_size=1, max_size=12)) + valid[cut:]
    try:
        decoded = decode_payload(mangled, max_metrics=1000)
    except PayloadError as exc:
        reason = exc.reason
    else:
        reason = ""
    if reason:
        assert "\n" not in reason
        return
    for i in range(len(decoded)):
        with contextlib.suppress(PayloadError):
            decoded.full_name(i)
    try:
        parsed = payload_class().FromString(mangled)
    except Exception:
        return  # upb is stricter in places (e.g. field numbers over 2^29): we need not be
    assert len(_flatten(parsed.metrics)) == len(decoded)


@given(st.binary(max_size=200))
@settings(max_examples=400, deadline=None)
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decoded = decode_payload(data, max_metrics=1000)
    except PayloadError:
        return
    sv.metric_values(decoded.rows, decoded.rows[:, C_DATATYPE])


def test_float_bits_are_read_exactly() -> None:
    payload = new_payload()
    payload.metrics.add().float_value = struct.unpack("<f", b"\x01\x00\x80\x7f")[0]  # a NaN
    payload.metrics.add().float_value = 3.4e38
    decoded = decode_payload(payload.SerializeToString(), max_metrics=10)
    value, _ = sv.metric_values(decoded.rows, np.zeros(2, np.int64))
    assert math.isnan(value[0])
    assert value[1] == np.float32(3.4e38)


def test_payloads_denser_than_the_first_guess_decode_whole() -> None:
    """Empty metrics (2 bytes each) and many small templates outgrow the first arrays."""
    assert len(decode_payload(b"\x12\x00" * 1000, max_metrics=10_000)) == 1000
    payload = new_payload()
    for i in range(40):
        t = payload.metrics.add()
        t.name = f"t{i}"
        t.template_value.metrics.add().name = "m"
    decoded = decode_payload(payload.SerializeToString(), max_metrics=10_000)
    assert [decoded.full_name(i) for i in range(len(decoded))] == [f"t{i}" for i in range(40)] + [
        f"t{i}/m" for i in range(40)
    ]
