"""Tests of the decode stage: wire format v1 acceptance, every rejection reason, fuzzing."""

from __future__ import annotations

import re
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import Batch, Channel, DecodeLimits, decode_batch, parse_topic
from ingest.errors import PayloadError

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
NOW = T0 + 3_600_000_000  # 2026-01-01T01:00:00Z
LIMITS = DecodeLimits()
WINDOW_END = "2026-01-02T01:00:00Z"
NAME_RULE = "has a character outside A-Z a-z 0-9 _ . : -"


def mp(obj: Any) -> bytes:
    return msgspec.msgpack.encode(obj)


def js(obj: Any) -> bytes:
    return msgspec.json.encode(obj)


def f8(*xs: float) -> bytes:
    return np.array(xs, dtype="<f8").tobytes()


def i8(*xs: int) -> bytes:
    return np.array(xs, dtype="<i8").tobytes()


def batch(*channels: Any, **top: Any) -> dict[str, Any]:
    return {"v": 1, "t0": T0, "ch": list(channels), **top}


def ch(s: str = "a", v: Any = (1.0,), **keys: Any) -> dict[str, Any]:
    return {"s": s, "v": list(v) if isinstance(v, tuple) else v, **keys}


def decode(
    payload: bytes,
    *,
    content_type: str | None = None,
    limits: DecodeLimits = LIMITS,
    now_us: int = NOW,
) -> Batch:
    b = decode_batch(payload, content_type=content_type, limits=limits, now_us=now_us)
    check_columns(b, payload)
    return b


def check_columns(b: Batch, payload: bytes) -> None:
    """The batch owns its three columns; the channels are consecutive views of them."""
    raw = np.frombuffer(payload, dtype=np.uint8)
    columns: tuple[tuple[np.ndarray, type], ...] = (
        (b.time, np.int64),
        (b.value, np.float64),
        (b.quality, np.uint8),
    )
    for column, dtype in columns:
        assert column.dtype == dtype
        assert column.shape == (b.readings,)
        assert column.flags.owndata
        assert column.flags.c_contiguous
        assert column.flags.writeable
        assert not np.shares_memory(column, raw)
    at = 0
    for c in b.channels:
        n = len(c.time)
        for part, (column, _) in zip((c.time, c.value, c.quality), columns, strict=True):
            assert isinstance(part, np.ndarray)
            assert part.base is column
            assert part.shape == (n,)
            assert np.shares_memory(part, column[at : at + n])
        at += n
    assert at == b.readings


def reason(payload: bytes, **kw: Any) -> str:
    with pytest.raises(PayloadError) as info:
        decode(payload, **kw)
    assert info.value.reason == str(info.value)
    assert "\n" not in info.value.reason
    return info.value.reason


def only(b: Batch) -> Channel:
    assert len(b.channels) == 1
    return b.channels[0]


def assert_channel(
    c: Channel,
    *,
    name: str,
    time: list[int],
    value: list[float] | np.ndarray,
    quality: list[int] | None = None,
    unit: str | None = None,
) -> None:
    assert c.name == name
    assert c.unit == unit
    np.testing.assert_array_equal(c.time, np.array(time, dtype=np.int64))
    np.testing.assert_array_equal(c.value, np.asarray(value, dtype=np.float64))
    q = [0] * len(time) if quality is None else quality
    np.testing.assert_array_equal(c.quality, np.array(q, dtype=np.uint8))
    for arr, dtype in ((c.time, np.int64), (c.value, np.float64), (c.quality, np.uint8)):
        assert arr.dtype == dtype
        assert arr.flags.c_contiguous
        assert arr.flags.writeable


# ------------------------------------------------------------------------------------------
# Acceptance: MessagePack
# ------------------------------------------------------------------------------------------


def test_wire_format_example() -> None:
    payload = mp(
        {
            "v": 1,
            "t0": T0,
            "seq": 42,
            "ch": [
                {"s": "spindle.temp", "dt": 1_000_000, "v": f8(71.2, 71.4, 71.9), "u": "degC"},
                {"s": "vib.rms", "t": [0, 250_000, 500_000], "v": [0.12, 0.13, 0.11]},
            ],
        }
    )
    b = decode(payload)
    assert b.seq == 42
    assert b.readings == 6
    temp, vib = b.channels
    assert_channel(
        temp,
        name="spindle.temp",
        unit="degC",
        time=[T0, T0 + 1_000_000, T0 + 2_000_000],
        value=[71.2, 71.4, 71.9],
    )
    assert_channel(
        vib, name="vib.rms", time=[T0, T0 + 250_000, T0 + 500_000], value=[0.12, 0.13, 0.11]
    )


def test_msgpack_bin_f8_keeps_every_bit() -> None:
    values = [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 5e-324]
    c = only(decode(mp(batch(ch(v=f8(*values), dt=10)))))
    assert_channel(c, name="a", time=[T0 + 10 * i for i in range(7)], value=values)
    assert c.value.tobytes() == f8(*values)


def test_msgpack_bin_f4_is_widened() -> None:
    values = [0.1, 2.5, -3.25]
    raw = np.array(values, dtype="<f4").tobytes()
    c = only(decode(mp(batch(ch(v=raw, vt="f4", dt=1)))))
    expected = np.array(values, dtype=np.float32).astype(np.float64)
    assert_channel(c, name="a", time=[T0, T0 + 1, T0 + 2], value=expected)


def test_msgpack_explicit_vt_f8() -> None:
    c = only(decode(mp(batch(ch(v=f8(1.0, 2.0), vt="f8", dt=5)))))
    assert_channel(c, name="a", time=[T0, T0 + 5], value=[1.0, 2.0])


def test_msgpack_array_of_numbers_mixes_ints_and_floats() -> None:
    c = only(decode(mp(batch(ch(v=[1, 2.5, -3, float("nan")], dt=2)))))
    assert_channel(c, name="a", time=[T0, T0 + 2, T0 + 4, T0 + 6], value=[1, 2.5, -3, np.nan])


def test_vt_is_ignored_for_an_array_of_numbers() -> None:
    c = only(decode(mp(batch(ch(v=[0.1, 0.2], vt="f4", dt=1)))))
    assert_channel(c, name="a", time=[T0, T0 + 1], value=[0.1, 0.2])


def test_msgpack_t_bin_with_negative_offsets() -> None:
    c = only(decode(mp(batch(ch(v=f8(1, 2, 3), t=i8(-5, 0, 7))))))
    assert_channel(c, name="a", time=[T0 - 5, T0, T0 + 7], value=[1, 2, 3])


def test_msgpack_t_array() -> None:
    c = only(decode(mp(batch(ch(v=[1, 2, 3], t=[3, 1, 2])))))
    assert_channel(c, name="a", time=[T0 + 3, T0 + 1, T0 + 2], value=[1, 2, 3])


def test_single_value_needs_neither_dt_nor_t() -> None:
    c = only(decode(mp(batch(ch(v=f8(9.5))))))
    assert_channel(c, name="a", time=[T0], value=[9.5])


def test_dt_with_a_single_value() -> None:
    c = only(decode(mp(batch(ch(v=[9.5], dt=2**63 - 1)))))
    assert_channel(c, name="a", time=[T0], value=[9.5])


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        (7, [7, 7, 7]),
        (255, [255, 255, 255]),
        (b"\x00\x01\xff", [0, 1, 255]),
        ([0, 200, 3], [0, 200, 3]),
    ],
    ids=["scalar", "scalar-max", "bin", "array"],
)
def test_msgpack_quality(q: Any, expected: list[int]) -> None:
    c = only(decode(mp(batch(ch(v=[1, 2, 3], dt=1, q=q)))))
    assert_channel(c, name="a", time=[T0, T0 + 1, T0 + 2], value=[1, 2, 3], quality=expected)


def test_units_and_seq() -> None:
    payload = mp(
        batch(
            ch("x", u="degC"),
            ch("y", u="m/s²"),
            ch("z", u="kg m"),
            ch("w"),
            seq=2**63 - 1,
        )
    )
    b = decode(payload)
    assert b.seq == 2**63 - 1
    assert [c.unit for c in b.channels] == ["degC", "m/s²", "kg m", None]


def test_seq_is_optional() -> None:
    assert decode(mp(batch(ch()))).seq is None


def test_same_sensor_in_two_channels_is_kept_as_two_channels() -> None:
    b = decode(mp(batch(ch("a", v=[1.0], u="kW"), ch("a", v=[2.0], t=[5]), ch("a", u="kW"))))
    assert [c.name for c in b.channels] == ["a", "a", "a"]
    assert b.readings == 3


def test_window_bounds_are_inclusive() -> None:
    limits = DecodeLimits(min_time_us=T0, max_future_us=1_000)
    c = only(decode(mp(batch(ch(v=[1, 2], t=[0, NOW + 1_000 - T0]))), limits=limits))
    assert_channel(c, name="a", time=[T0, NOW + 1_000], value=[1, 2])


def test_dt_up_to_the_int64_limit() -> None:
    end = 2**63 - 1
    limits = DecodeLimits(max_future_us=end - NOW)
    c = only(decode(mp(batch(ch(v=[1, 2], dt=end - T0))), limits=limits))
    assert_channel(c, name="a", time=[T0, end], value=[1, 2])


def test_result_does_not_share_the_payload() -> None:
    payload = bytearray(mp(batch(ch(v=f8(1, 2), t=i8(0, 1), q=b"\x01\x02"))))
    c = only(decode(payload))  # type: ignore[arg-type]
    payload[:] = b"\x00" * len(payload)
    assert_channel(c, name="a", time=[T0, T0 + 1], value=[1, 2], quality=[1, 2])


def test_readings_limit_is_inclusive() -> None:
    limits = DecodeLimits(max_readings=4)
    assert decode(mp(batch(ch(v=[1, 2], dt=1), ch(v=f8(3, 4), dt=1))), limits=limits).readings == 4


def test_payload_size_limit_is_inclusive() -> None:
    payload = mp(batch(ch()))
    assert decode(payload, limits=DecodeLimits(max_payload_bytes=len(payload))).readings == 1


# ------------------------------------------------------------------------------------------
# Acceptance: JSON
# ------------------------------------------------------------------------------------------


def test_json_batch_with_int_t0() -> None:
    payload = js(
        batch(
            ch("p.kw", v=[1, 2.5], dt=1_000, q=[0, 3], u="kW"),
            ch("flag", v=[0, 1], t=[-1, 1], q=2),
            seq=7,
        )
    )
    b = decode(payload)
    assert b.seq == 7
    assert b.readings == 4
    kw, flag = b.channels
    assert_channel(
        kw, name="p.kw", unit="kW", time=[T0, T0 + 1_000], value=[1, 2.5], quality=[0, 3]
    )
    assert_channel(flag, name="flag", time=[T0 - 1, T0 + 1], value=[0, 1], quality=[2, 2])


@pytest.mark.parametrize(
    ("t0", "expected"),
    [
        ("2026-01-01T00:00:00Z", T0),
        ("2026-01-01T00:00:00.25Z", T0 + 250_000),
        ("2026-01-01T00:00:00.000001Z", T0 + 1),
        ("2026-01-01T02:00:00.5+02:00", T0 + 500_000),
        ("2025-12-31T19:00:00-05:00", T0),
        ("2026-01-01t00:00:00z", T0),
    ],
)
def test_json_batch_with_rfc3339_t0(t0: str, expected: int) -> None:
    c = only(decode(js(batch(ch(v=[1, 2], dt=10), t0=t0))))
    assert_channel(c, name="a", time=[expected, expected + 10], value=[1, 2])


def test_json_single_sample() -> None:
    payload = (
        b'{"ts": "2026-01-01T00:00:00.250Z", "values": {"spindle.temp": 71.2, "power.kw": 13}}'
    )
    b = decode(payload)
    assert b.seq is None
    assert b.readings == 2
    temp, kw = b.channels
    assert_channel(temp, name="spindle.temp", time=[T0 + 250_000], value=[71.2])
    assert_channel(kw, name="power.kw", time=[T0 + 250_000], value=[13])


def test_json_single_sample_with_int_ts() -> None:
    c = only(decode(js({"ts": T0 + 1, "values": {"a": -1.5}})))
    assert_channel(c, name="a", time=[T0 + 1], value=[-1.5])


def test_json_array_of_single_samples_groups_by_sensor() -> None:
    payload = js(
        [
            {"ts": T0, "values": {"a": 1, "b": 2}},
            {"ts": "2026-01-01T00:00:01Z", "values": {"c": 3, "a": 4}},
            {"ts": T0 + 2_000_000, "values": {"a": 5}},
        ]
    )
    b = decode(payload)
    assert b.seq is None
    assert b.readings == 5
    a, b_, c = b.channels
    assert_channel(a, name="a", time=[T0, T0 + 1_000_000, T0 + 2_000_000], value=[1, 4, 5])
    assert_channel(b_, name="b", time=[T0], value=[2])
    assert_channel(c, name="c", time=[T0 + 1_000_000], value=[3])


# ------------------------------------------------------------------------------------------
# Content type and sniffing
# ------------------------------------------------------------------------------------------

JSON_BATCH = js(batch(ch(v=[1.0])))
MSGPACK_BATCH = mp(batch(ch(v=[1.0])))


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        (JSON_BATCH, "application/json"),
        (JSON_BATCH, "Application/JSON; charset=utf-8"),
        (JSON_BATCH, None),
        (b" \r\n\t" + JSON_BATCH, None),
        (js([{"ts": T0, "values": {"a": 1.0}}]), None),
        (JSON_BATCH, ""),
        (MSGPACK_BATCH, "application/msgpack"),
        (MSGPACK_BATCH, " APPLICATION/MSGPACK ;x=y"),
        (MSGPACK_BATCH, None),
    ],
)
def test_content_type_selection(payload: bytes, content_type: str | None) -> None:
    c = only(decode(payload, content_type=content_type))
    assert_channel(c, name="a", time=[T0], value=[1.0])


def test_content_type_wins_over_sniffing() -> None:
    assert reason(JSON_BATCH, content_type="application/msgpack") == (
        "payload: trailing data after the MessagePack value at byte 1"
    )
    assert reason(MSGPACK_BATCH, content_type="application/json") == (
        "payload: JSON text is not UTF-8 (byte 0x83 at offset 0)"
    )


# ------------------------------------------------------------------------------------------
# Rejections: one rule each, exact reason
# ------------------------------------------------------------------------------------------

LONG = "x" * 70

MSGPACK_REJECTIONS: list[tuple[str, Any, str]] = [
    # top level
    ("not-a-map", 5, "payload: expected a map, got an integer"),
    ("unknown-key", {**batch(ch()), "extra": 1}, "payload: unknown field 'extra'"),
    ("unknown-key-hostile", {**batch(ch()), "a\nb": 1}, "payload: unknown field 'a\\nb'"),
    ("key-type", {1: 2}, "payload: key: expected a string, got an integer"),
    (
        "ch-key-type",
        batch({"s": "a", "v": [1.0], 5: 1}),
        "ch[0]: key: expected a string, got an integer",
    ),
    ("missing-v", {"t0": T0, "ch": [ch()]}, "v: missing required field"),
    ("missing-t0", {"v": 1, "ch": [ch()]}, "t0: missing required field"),
    ("missing-ch", {"v": 1, "t0": T0}, "ch: missing required field"),
    ("v-type", batch(ch(), v="1"), "v: expected an integer, got a string"),
    ("v-bool", batch(ch(), v=True), "v: expected an integer, got a boolean"),
    ("v-2", batch(ch(), v=2), "v: unsupported format version 2"),
    ("v-2-other-shape", {"v": 2, "payload": b"..."}, "v: unsupported format version 2"),
    ("t0-type", batch(ch(), t0="2026-01-01T00:00:00Z"), "t0: expected an integer, got a string"),
    ("t0-float", batch(ch(), t0=1.0e15), "t0: expected an integer, got a number"),
    (
        "t0-early",
        batch(ch(), t0=946_684_799_000_000),
        "t0: 1999-12-31T23:59:59Z is before the accepted window (starts 2000-01-01T00:00:00Z)",
    ),
    (
        "t0-late",
        batch(ch(), t0=NOW + 86_400_000_001),
        f"t0: 2026-01-02T01:00:00.000001Z is after the accepted window (ends {WINDOW_END})",
    ),
    (
        "t0-int64-min",
        batch(ch(), t0=-(2**63)),
        "t0: -9223372036854775808 us since the epoch is before the accepted window"
        " (starts 2000-01-01T00:00:00Z)",
    ),
    ("seq-negative", batch(ch(), seq=-1), "seq: -1 is below the minimum 0"),
    (
        "seq-over-int64",
        batch(ch(), seq=2**63),
        "seq: 9223372036854775808 is above the maximum 9223372036854775807",
    ),
    ("seq-nil", batch(ch(), seq=None), "seq: expected an integer, got nil"),
    ("ch-empty", batch(), "ch: is empty; at least one channel is required"),
    ("ch-not-array", {"v": 1, "t0": T0, "ch": {"s": "a"}}, "ch: expected an array, got a map"),
    # channel keys
    ("ch-not-map", batch(ch(), 5), "ch[1]: expected a map, got an integer"),
    ("ch-unknown-key", batch(ch(x=1)), "ch[0]: unknown field 'x'"),
    ("ch-missing-s", batch({"v": [1.0]}), "ch[0].s: missing required field"),
    ("ch-missing-v", batch({"s": "a"}), "ch[0].v: missing required field"),
    # s
    ("s-type", batch({"s": b"a", "v": [1.0]}), "ch[0].s: expected a string, got bin"),
    ("s-char", batch(ch(), ch("a b")), f"ch[1].s: 'a b' {NAME_RULE}"),
    ("s-slash", batch(ch("a/b")), f"ch[0].s: 'a/b' {NAME_RULE}"),
    ("s-control", batch(ch("a\n\x1b")), f"ch[0].s: 'a\\n\\x1b' {NAME_RULE}"),
    ("s-empty", batch(ch("")), "ch[0].s: is empty"),
    ("s-long", batch(ch(LONG)), "ch[0].s: has 70 characters, over the 64-character limit"),
    # v
    ("v-str", batch(ch(v="1.0")), "ch[0].v: expected bin or an array, got a string"),
    (
        "v-bool-element",
        batch(ch(v=[1.0, True], dt=1)),
        "ch[0].v[1]: expected a number, got a boolean",
    ),
    ("v-nil-element", batch(ch(v=[None])), "ch[0].v[0]: expected a number, got nil"),
    (
        "v-bin-length",
        batch(ch(), ch(), ch(v=b"\x00" * 23)),
        "ch[2].v: length 23 is not a multiple of 8",
    ),
    (
        "v-bin-f4-length",
        batch(ch(v=b"\x00" * 6, vt="f4")),
        "ch[0].v: length 6 is not a multiple of 4",
    ),
    ("v-bin-empty", batch(ch(v=b"")), "ch[0].v: is empty; at least one value is required"),
    ("v-array-empty", batch(ch(v=[])), "ch[0].v: is empty; at least one value is required"),
    # vt
    ("vt-bad", batch(ch(v=f8(1.0), vt="f2")), 'ch[0].vt: \'f2\' is not "f8" or "f4"'),
    ("vt-bad-array", batch(ch(vt="F8")), 'ch[0].vt: \'F8\' is not "f8" or "f4"'),
    ("vt-type", batch(ch(vt=8)), "ch[0].vt: expected a string, got an integer"),
    # dt / t
    ("dt-zero", batch(ch(v=[1, 2], dt=0)), "ch[0].dt: 0 is below the minimum 1"),
    ("dt-negative", batch(ch(v=[1, 2], dt=-5)), "ch[0].dt: -5 is below the minimum 1"),
    ("dt-bool", batch(ch(v=[1, 2], dt=True)), "ch[0].dt: expected an integer, got a boolean"),
    ("dt-float", batch(ch(v=[1, 2], dt=1.5)), "ch[0].dt: expected an integer, got a number"),
    (
        "dt-huge",
        batch(ch(v=[1, 2], dt=2**64 - 1)),
        "ch[0].dt: 18446744073709551615 is above the maximum 9223372036854775807",
    ),
    ("dt-and-t", batch(ch(v=[1, 2], dt=1, t=[0, 1])), "ch[0].t: not allowed together with dt"),
    ("no-dt-no-t", batch(ch(v=f8(1, 2, 3))), "ch[0].dt: one of dt or t is required for 3 values"),
    ("t-bin-length", batch(ch(v=[1], t=b"\x00" * 12)), "ch[0].t: length 12 is not a multiple of 8"),
    ("t-bin-count", batch(ch(v=[1, 2, 3, 4], t=i8(0, 1, 2))), "ch[0].t: 3 offsets for 4 values"),
    ("t-array-count", batch(ch(v=[1, 2], t=[0, 1, 2])), "ch[0].t: 3 offsets for 2 values"),
    (
        "t-element-type",
        batch(ch(v=[1, 2], t=[0, 1.5])),
        "ch[0].t[1]: expected an integer, got a number",
    ),
    (
        "t-element-uint64",
        batch(ch(v=[1], t=[2**64 - 1])),
        "ch[0].t[0]: 18446744073709551615 is above the maximum 9223372036854775807",
    ),
    ("t-type", batch(ch(v=[1], t=0)), "ch[0].t: expected bin or an array, got an integer"),
    (
        "t-early",
        batch(ch(v=[1, 2, 3], t=i8(0, -1, 5)), t0=946_684_800_000_000),
        "ch[0].t: 1999-12-31T23:59:59.999999Z is before the accepted window"
        " (starts 2000-01-01T00:00:00Z)",
    ),
    (
        "t-late",
        batch(ch(v=[1, 2], t=[0, 86_400_000_000 + 3_600_000_001])),
        f"ch[0].t: 2026-01-02T01:00:00.000001Z is after the accepted window (ends {WINDOW_END})",
    ),
    (
        "t-overflow",
        batch(ch(v=[1, 2], t=i8(0, 2**63 - 1))),
        "ch[0].t: 9225139262454775807 us since the epoch is after the accepted window"
        f" (ends {WINDOW_END})",
    ),
    (
        "t-underflow",
        batch(ch(v=[1], t=[-(2**63)])),
        "ch[0].t: -9221604811254775808 us since the epoch is before the accepted window"
        " (starts 2000-01-01T00:00:00Z)",
    ),
    (
        "dt-late",
        batch(ch(v=[1, 2, 3], dt=50_000_000_000)),
        f"ch[0].dt: 2026-01-02T03:46:40Z is after the accepted window (ends {WINDOW_END})",
    ),
    (
        "dt-overflow",
        batch(ch(v=[1, 2, 3], dt=2**63 - 1)),
        f"ch[0].dt: {T0 + 2 * (2**63 - 1)} us since the epoch is after the accepted window"
        f" (ends {WINDOW_END})",
    ),
    # q
    ("q-over", batch(ch(q=256)), "ch[0].q: 256 is above the maximum 255"),
    ("q-negative", batch(ch(q=-1)), "ch[0].q: -1 is below the minimum 0"),
    ("q-bool", batch(ch(q=False)), "ch[0].q: expected an integer, bin or an array, got a boolean"),
    ("q-str", batch(ch(q="0")), "ch[0].q: expected an integer, bin or an array, got a string"),
    (
        "q-element",
        batch(ch(v=[1, 2], dt=1, q=[0, 300])),
        "ch[0].q[1]: 300 is above the maximum 255",
    ),
    (
        "q-bin-count",
        batch(ch(v=[1, 2, 3], dt=1, q=b"\x00\x00")),
        "ch[0].q: 2 quality values for 3 values",
    ),
    ("q-array-count", batch(ch(v=[1], q=[0, 0])), "ch[0].q: 2 quality values for 1 values"),
    # u
    ("u-type", batch(ch(u=1)), "ch[0].u: expected a string, got an integer"),
    ("u-nil", batch(ch(u=None)), "ch[0].u: expected a string, got nil"),
    ("u-empty", batch(ch(u="")), "ch[0].u: is empty"),
    ("u-long", batch(ch(u="k" * 33)), "ch[0].u: has 33 characters, over the 32-character limit"),
    ("u-control", batch(ch(u="deg\nC")), "ch[0].u: 'deg\\nC' has a non-printable character"),
    ("u-tab", batch(ch(u="deg\tC")), "ch[0].u: 'deg\\tC' has a non-printable character"),
    ("u-space", batch(ch(u=" kW")), "ch[0].u: ' kW' has a leading or trailing space"),
    (
        "u-conflict",
        batch(ch("p", u="kW"), ch("q", u="W"), ch("p", u="W")),
        "ch[2].u: 'W' differs from 'kW' given for the same sensor in ch[0]",
    ),
]


@pytest.mark.parametrize(
    ("obj", "expected"),
    [pytest.param(obj, expected, id=case) for case, obj, expected in MSGPACK_REJECTIONS],
)
def test_msgpack_rejection(obj: Any, expected: str) -> None:
    assert reason(mp(obj)) == expected


JSON_REJECTIONS: list[tuple[str, bytes, str]] = [
    ("malformed", b'{"v": 1,', "payload: truncated at byte 8"),
    (
        "top-string",
        b' "x"',
        "payload: trailing data after the MessagePack value at byte 1",
    ),  # sniffed: MessagePack
    ("unknown-key", js({**batch(ch()), "x": 1}), "payload: unknown field 'x'"),
    ("missing-v", js({"t0": T0, "ch": [ch()]}), "v: missing required field"),
    ("missing-t0", js({"v": 1, "ch": [ch()]}), "t0: missing required field"),
    ("missing-ch", js({"v": 1, "t0": T0}), "ch: missing required field"),
    ("empty-object", b"{}", "v: missing required field"),
    ("v-2", js(batch(ch(), v=2)), "v: unsupported format version 2"),
    ("v-2-other-shape", js({"v": 2, "data": [1]}), "v: unsupported format version 2"),
    ("seq-null", js(batch(ch(), seq=None)), "seq: expected an integer, got null"),
    (
        "t0-naive",
        js(batch(ch(), t0="2026-01-01T00:00:00")),
        "t0: '2026-01-01T00:00:00' has no timezone; add Z or an offset",
    ),
    (
        "t0-bad-date",
        js(batch(ch(), t0="2026-13-01T00:00:00Z")),
        "t0: '2026-13-01T00:00:00Z' is not an RFC 3339 time",
    ),
    (
        "t0-float",
        js(batch(ch(), t0=1.0)),
        "t0: expected an integer or an RFC 3339 time, got a number",
    ),
    (
        "t0-early-rfc3339",
        js(batch(ch(), t0="1999-12-31T23:59:59Z")),
        "t0: 1999-12-31T23:59:59Z is before the accepted window (starts 2000-01-01T00:00:00Z)",
    ),
    ("v-base64", js(batch(ch(v="AAAAAAAA8D8="))), "ch[0].v: expected an array, got a string"),
    ("v-true", js(batch(ch(v=[True]))), "ch[0].v[0]: expected a number, got a boolean"),
    ("v-null", js(batch(ch(v=[None]))), "ch[0].v[0]: expected a number, got null"),
    (
        "v-out-of-range",
        b'{"v":1,"t0":1,"ch":[{"s":"a","v":[1e999]}]}',
        "ch[0].v[0]: number out of range",
    ),
    ("t-base64", js(batch(ch(t="AAAAAAAAAAA="))), "ch[0].t: expected an array, got a string"),
    ("q-base64", js(batch(ch(q="AA=="))), "ch[0].q: expected an integer or an array, got a string"),
    (
        "mixed-shapes",
        js({"v": 1, "ts": T0, "values": {"a": 1}}),
        "payload: mixes batch keys (v) with single-sample keys (ts, values)",
    ),
    ("sample-missing-values", js({"ts": T0}), "values: missing required field"),
    ("sample-missing-ts", js({"values": {"a": 1}}), "ts: missing required field"),
    (
        "sample-empty",
        js({"ts": T0, "values": {}}),
        "values: is empty; at least one reading is required",
    ),
    (
        "sample-bool",
        js({"ts": T0, "values": {"a": True}}),
        "values[...]: expected a number, got a boolean",
    ),
    (
        "sample-string",
        js({"ts": T0, "values": {"a": "1"}}),
        "values[...]: expected a number, got a string",
    ),
    ("sample-name", js({"ts": T0, "values": {"a b": 1}}), f"values: sensor name 'a b' {NAME_RULE}"),
    ("sample-name-empty", js({"ts": T0, "values": {"": 1}}), "values: sensor name is empty"),
    (
        "sample-ts-naive",
        js({"ts": "2026-01-01T00:00:00", "values": {"a": 1}}),
        "ts: '2026-01-01T00:00:00' has no timezone; add Z or an offset",
    ),
    (
        "sample-ts-late",
        js({"ts": "2026-01-03T00:00:00Z", "values": {"a": 1}}),
        f"ts: 2026-01-03T00:00:00Z is after the accepted window (ends {WINDOW_END})",
    ),
    ("array-empty", b"[]", "payload: empty JSON array; at least one sample is required"),
    (
        "array-item-type",
        js([{"ts": T0, "values": {"a": 1}}, 5]),
        "[1]: expected an object, got an integer",
    ),
    (
        "array-batch-item",
        js([batch(ch())]),
        "[0]: unknown field 'v' (a JSON array holds only single-sample objects)",
    ),
    (
        "array-item-missing-ts",
        js([{"ts": T0, "values": {"a": 1}}, {"values": {"a": 1}}]),
        "[1].ts: missing required field",
    ),
    (
        "array-item-empty",
        js([{"ts": T0, "values": {"a": 1}}, {"ts": T0, "values": {}}]),
        "[1].values: is empty; at least one reading is required",
    ),
    (
        "array-item-ts-early",
        js([{"ts": T0, "values": {"a": 1}}, {"ts": 0, "values": {"a": 1}}]),
        "[1].ts: 1970-01-01T00:00:00Z is before the accepted window (starts 2000-01-01T00:00:00Z)",
    ),
    (
        "array-item-name",
        js([{"ts": T0, "values": {"a:b": 1, "c d": 2}}]),
        f"[0].values: sensor name 'c d' {NAME_RULE}",
    ),
]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [pytest.param(payload, expected, id=case) for case, payload, expected in JSON_REJECTIONS],
)
def test_json_rejection(payload: bytes, expected: str) -> None:
    assert reason(payload) == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b'{"v":1,"t0":1,"ch":[{"s":"a","v":[NaN]}]}',
            "JSON is malformed: NaN is not a JSON number",
        ),
        (
            b'{"v":1,"t0":1,"ch":[{"s":"a","v":[-Infinity]}]}',
            "JSON is malformed: -Infinity is not a JSON number",
        ),
        (JSON_BATCH + b" x", f"trailing data after the JSON value at byte {len(JSON_BATCH) + 1}"),
        (b'{"v": 1, "t0": 1, "ch": [}', "JSON is malformed at byte 25"),
        ('{"ü": 1, "t0": 1, x'.encode(), "JSON is malformed at byte 19"),  # bytes, not characters
        (b'{"v": 1' + b"0" * 5000 + b"}", "JSON is malformed: a number has too many digits"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=[
        "nan-literal",
        "infinity-literal",
        "trailing",
        "bad-token",
        "offset-in-bytes",
        "long-number",
        "deep",
    ],
)
def test_malformed_json(payload: bytes, expected: str) -> None:
    assert reason(payload) == "payload: " + expected


def test_json_top_level_must_be_object_or_array() -> None:
    assert reason(b'"x"', content_type="application/json") == (
        "payload: expected an object or an array, got a string"
    )


def test_payload_size_is_checked_before_decoding() -> None:
    assert reason(b"\xc1" * 2_000_000) == "payload: 2000000 bytes exceeds the 1048576-byte limit"
    small = DecodeLimits(max_payload_bytes=10)
    assert reason(b"{" * 11, limits=small) == "payload: 11 bytes exceeds the 10-byte limit"


def test_empty_payload() -> None:
    assert reason(b"") == "payload: is empty"
    assert reason(b"", content_type="application/json") == "payload: is empty"


def test_blank_payload() -> None:
    assert reason(b" \t\r\n ") == "payload: holds only whitespace"


def test_malformed_msgpack() -> None:
    assert reason(b"\xc1") == "payload: MessagePack is malformed: byte 0 is 0xc1, which is no type"
    assert reason(b"\x92\x01\xc1") == (
        "payload: MessagePack is malformed: byte 2 is 0xc1, which is no type"
    )
    assert reason(MSGPACK_BATCH + b"\x00") == (
        f"payload: trailing data after the MessagePack value at byte {len(MSGPACK_BATCH)}"
    )
    assert reason(MSGPACK_BATCH[:-1]) == f"payload: truncated at byte {len(MSGPACK_BATCH) - 1}"
    assert reason(b"\x91" * 40 + b"\x01") == "payload: nested deeper than 32 levels"
    assert reason(b"\x81\x91\x01\x01") == "payload: key: expected a string, got an array"
    # Valid MessagePack that no decoder can hold as plain values, named where it stands.
    assert reason(b"\x81\x81\x01\x01\x01") == "payload: the map key at byte 1 is a map"
    assert reason(b"\x81\xd4\x05\x01\x01") == (
        "payload: the map key at byte 1 is an extension value"
    )
    assert reason(b"\xc7\x03\xff\x00\x00\x00") == (
        "payload: the timestamp at byte 0 has 3 bytes; 4, 8 or 12 are valid"
    )
    assert reason(b"\x81\xd6\xff\x00\x00\x00\x01\x01") == (
        "payload: key: expected a string, got a timestamp"
    )


@pytest.mark.parametrize(
    ("payload", "what", "offset"),
    [
        (b"\xdf\x00\x00\x00\x01\xa1\x80", "a string", 6),  # map key
        (mp(batch(ch())).replace(b"\xa1s\xa1a", b"\xa1s\xa1\x80"), "a string", 24),  # sensor name
        (b'{"ts": 1, "values": {"\x80": 1}}', "JSON text", 22),
    ],
    ids=["msgpack-key", "msgpack-value", "json"],
)
def test_strings_must_be_utf8(payload: bytes, what: str, offset: int) -> None:
    assert reason(payload) == f"payload: {what} is not UTF-8 (byte 0x80 at offset {offset})"


def test_huge_length_headers_do_not_allocate() -> None:
    # array32 / bin32 headers claiming 4 GiB in a tiny payload
    assert reason(b"\x83\xa1v\x01\xa2t0\x05\xa2ch\xdd\xff\xff\xff\xff") == (
        "payload: truncated at byte 16"
    )
    assert reason(b"\x81\xa2ch\x91\x82\xa1s\xa1a\xa1v\xc6\xff\xff\xff\xff") == (
        "payload: truncated at byte 17"
    )


def test_unsupported_content_type() -> None:
    assert reason(JSON_BATCH, content_type="text/plain") == (
        "content-type: 'text/plain' is not application/msgpack or application/json"
    )
    assert reason(JSON_BATCH, content_type="application/x-msgpack\n" + "z" * 200) == (
        "content-type: 'application/x-msgpack\\n" + "z" * 41 + "'..."
        " is not application/msgpack or application/json"
    )


def test_readings_limit_counts_all_channels_before_building_arrays() -> None:
    limits = DecodeLimits(max_readings=5)
    # ch[1]'s times are outside the window: the count is checked first, over all channels.
    payload = mp(batch(ch(v=f8(1, 2, 3), dt=1), ch(v=[1, 2, 3], t=[0, 1, -T0])))
    assert reason(payload, limits=limits) == "ch: 6 readings exceed the 5-reading limit"


def test_readings_limit_for_single_samples() -> None:
    limits = DecodeLimits(max_readings=2)
    payload = js([{"ts": T0, "values": {"a": 1, "b": 2}}, {"ts": T0, "values": {"a": 3}}])
    assert reason(payload, limits=limits) == "payload: 3 readings exceed the 2-reading limit"


def test_hostile_names_give_short_one_line_reasons() -> None:
    hostile = "evil\r\n" + "\u2028" * 10_000
    for payload in (
        mp(batch(ch(hostile))),
        mp({**batch(ch()), hostile: 1}),
        mp(batch({**ch(), hostile: 1})),
        js({"ts": T0, "values": {hostile: 1.0}}),
        mp(batch(ch(u=hostile[:30]))),
    ):
        text = reason(payload)
        assert text.isprintable(), text
        assert len(text) < 200, text


# ------------------------------------------------------------------------------------------
# Limits
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["max_payload_bytes", "max_readings", "min_time_us", "max_future_us"]
)
@pytest.mark.parametrize("value", [0, -1, True, 1.5])
def test_limits_must_be_positive_ints(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be a positive integer, got {value!r}$"):
        DecodeLimits(**{field: value})


def test_limits_defaults_and_unknown_fields() -> None:
    assert msgspec.convert({}, DecodeLimits) == DecodeLimits(
        max_payload_bytes=1_048_576,
        max_readings=1_000_000,
        min_time_us=946_684_800_000_000,
        max_future_us=86_400_000_000,
    )
    with pytest.raises(msgspec.ValidationError, match="unknown field `max_bytes`"):
        msgspec.convert({"max_bytes": 1}, DecodeLimits)


# ------------------------------------------------------------------------------------------
# Topics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        (
            "telemetry/plant1/press-shop/line2/press-07",
            "telemetry",
            ("plant1", "press-shop", "line2", "press-07"),
        ),
        ("telemetry/dev", "telemetry", ("dev",)),
        ("plant/telemetry/a/B_9.x:y/dev", "plant/telemetry", ("a", "B_9.x:y", "dev")),
        ("telemetry/dev", "telemetry/", ("dev",)),
        ("site/dev", "", ("site", "dev")),
        ("telemetry/" + "d" * 64, "telemetry", ("d" * 64,)),
    ],
)
def test_parse_topic(topic: str, prefix: str, expected: tuple[str, ...]) -> None:
    assert parse_topic(topic, prefix=prefix) == expected


@pytest.mark.parametrize(
    ("topic", "prefix", "expected"),
    [
        ("other/dev", "telemetry", "topic: 'other/dev' is not under the prefix 'telemetry'"),
        (
            "telemetryX/dev",
            "telemetry",
            "topic: 'telemetryX/dev' is not under the prefix 'telemetry'",
        ),
        ("telemetry", "telemetry", "topic: 'telemetry' is not under the prefix 'telemetry'"),
        (
            "plant/dev",
            "plant/telemetry",
            "topic: 'plant/dev' is not under the prefix 'plant/telemetry'",
        ),
        ("telemetry/", "telemetry", "topic: no device id after the prefix"),
        ("telemetry/a//dev", "telemetry", "topic: level 2 after the prefix is empty"),
        ("telemetry/a/", "telemetry", "topic: level 2 after the prefix is empty"),
        ("telemetry/a b/dev", "telemetry", f"topic: level 1 after the prefix 'a b' {NAME_RULE}"),
        ("telemetry/a/+", "telemetry", f"topic: level 2 after the prefix '+' {NAME_RULE}"),
        ("telemetry/a/d\n", "telemetry", f"topic: level 2 after the prefix 'd\\n' {NAME_RULE}"),
        (
            "telemetry/a/dévice",
            "telemetry",
            f"topic: level 2 after the prefix 'dévice' {NAME_RULE}",
        ),
        (
            "telemetry/" + "d" * 65,
            "telemetry",
            "topic: level 1 after the prefix has 65 characters, over the 64-character limit",
        ),
    ],
)
def test_parse_topic_rejects(topic: str, prefix: str, expected: str) -> None:
    with pytest.raises(PayloadError) as info:
        parse_topic(topic, prefix=prefix)
    assert info.value.reason == expected


def test_parse_topic_reason_is_short_for_a_hostile_topic() -> None:
    with pytest.raises(PayloadError) as info:
        parse_topic("x\n" * 10_000, prefix="telemetry")
    assert info.value.reason.isprintable()
    assert len(info.value.reason) < 400


# ------------------------------------------------------------------------------------------
# Property tests: any input gives a Batch or a PayloadError, never another exception
# ------------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,  # no timed assertions; a hang would show as a stuck test run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

names = st.one_of(
    st.sampled_from(["a", "b", "temp.1", "x:y-z_0"]),
    st.text(max_size=70),
)
ints = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.integers(min_value=T0 - 10**10, max_value=T0 + 10**10),
    st.sampled_from([0, 1, -1, 255, 256, 2**63 - 1, 2**63, -(2**63)]),
)
scalars = st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=8))
byte_blobs = st.one_of(
    st.binary(max_size=48),
    st.lists(st.floats(), max_size=6).map(lambda xs: np.array(xs, dtype="<f8").tobytes()),
    st.lists(st.integers(-(2**40), 2**40), max_size=6).map(
        lambda xs: np.array(xs, dtype="<i8").tobytes()
    ),
)
numbers = st.lists(st.one_of(st.floats(), ints, st.booleans()), max_size=6)
field_values = st.one_of(scalars, byte_blobs, numbers)
times = st.one_of(
    ints,
    st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00", "nope"]),
)
channels = st.fixed_dictionaries(
    {"s": st.one_of(names, scalars), "v": st.one_of(byte_blobs, numbers, scalars)},
    optional={
        "vt": st.sampled_from(["f8", "f4", "f2", 4]),
        "dt": st.one_of(st.integers(-2, 10**12), ints, scalars),
        "t": st.one_of(byte_blobs, st.lists(ints, max_size=6), scalars),
        "q": st.one_of(
            st.integers(-1, 256), byte_blobs, st.lists(st.integers(-1, 256), max_size=6)
        ),
        "u": st.one_of(st.text(max_size=40), scalars),
        "extra": field_values,
    },
)
batches = st.fixed_dictionaries(
    {
        "v": st.one_of(st.just(1), scalars),
        "t0": st.one_of(st.just(T0), times),
        "ch": st.one_of(st.lists(channels, max_size=4), scalars),
    },
    optional={"seq": st.one_of(ints, scalars), "extra": field_values},
)
samples = st.fixed_dictionaries(
    {
        "ts": st.one_of(st.just(T0), times),
        "values": st.dictionaries(
            names, st.one_of(st.floats(allow_nan=False), scalars), max_size=4
        ),
    },
    optional={"v": scalars},
)
VALID_NAMES = ["a", "b", "temp.1", "x:y-z_0"]


def perturb(draw: st.DrawFn, obj: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """Most of the time leave a valid map alone; else replace, delete or add one key."""
    kind = draw(st.sampled_from(["keep", "keep", "keep", "replace", "delete", "add"]))
    if kind == "replace":
        obj[draw(st.sampled_from(sorted(obj)))] = draw(field_values)
    elif kind == "delete":
        del obj[draw(st.sampled_from(sorted(obj)))]
    elif kind == "add":
        obj[draw(st.sampled_from([*keys, "extra"]))] = draw(field_values)
    return obj


@st.composite
def valid_channels(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 5))
    values = draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n))
    c: dict[str, Any] = {"s": draw(st.sampled_from(VALID_NAMES))}
    form = draw(st.sampled_from(["f8", "f4", "list"]))
    if form == "list":
        c["v"] = values
    else:
        c["v"] = np.array(values, dtype="<" + form).tobytes()
        if form == "f4" or draw(st.booleans()):
            c["vt"] = form
    timing = draw(
        st.sampled_from(["dt", "t-bin", "t-list", "none"] if n == 1 else ["dt", "t-bin", "t-list"])
    )
    if timing == "dt":
        c["dt"] = draw(st.integers(1, 10**9))
    elif timing != "none":
        offsets = draw(st.lists(st.integers(-(10**9), 10**9), min_size=n, max_size=n))
        c["t"] = i8(*offsets) if timing == "t-bin" else offsets
    quality = draw(st.sampled_from(["none", "int", "bin", "list"]))
    if quality == "int":
        c["q"] = draw(st.integers(0, 255))
    elif quality != "none":
        qs = draw(st.lists(st.integers(0, 255), min_size=n, max_size=n))
        c["q"] = bytes(qs) if quality == "bin" else qs
    if draw(st.booleans()):
        c["u"] = draw(st.sampled_from(["degC", "kW", "m/s²"]))
    return perturb(draw, c, ["s", "v", "vt", "dt", "t", "q", "u"])


@st.composite
def valid_batches(draw: st.DrawFn) -> dict[str, Any]:
    b = batch(
        *draw(st.lists(valid_channels(), min_size=1, max_size=4)),
        t0=draw(st.one_of(st.integers(T0 - 10**10, NOW), st.just("2026-01-01T00:00:00Z"))),
    )
    if draw(st.booleans()):
        b["seq"] = draw(st.integers(0, 2**63 - 1))
    return perturb(draw, b, ["v", "t0", "ch", "seq", "ts", "values"])


@st.composite
def valid_samples(draw: st.DrawFn) -> dict[str, Any]:
    sample = {
        "ts": draw(st.one_of(st.integers(T0 - 10**10, NOW), st.just("2026-01-01T00:00:00.5Z"))),
        "values": draw(
            st.dictionaries(st.sampled_from(VALID_NAMES), st.floats(-1e6, 1e6), min_size=1)
        ),
    }
    return perturb(draw, sample, ["ts", "values", "v", "ch"])


documents = st.one_of(
    valid_batches(),
    valid_samples(),
    st.lists(valid_samples(), min_size=1, max_size=4),
    batches,
    samples,
    st.lists(samples, max_size=4),
    st.lists(batches, max_size=2),
)
limits = st.sampled_from([LIMITS, DecodeLimits(max_readings=3, max_payload_bytes=200)])
content_types = st.sampled_from([None, "application/json", "application/msgpack", "text/x"])


FIELD_NAMES = {"payload", "content-type", "v", "t0", "seq", "ch", "s", "vt", "dt", "t", "q", "u"}
FIELD_NAMES |= {"ts", "values"}


def check_outcome(payload: bytes, content_type: str | None, lim: DecodeLimits) -> None:
    why: str | None = None
    try:
        b = decode(payload, content_type=content_type, limits=lim)
    except PayloadError as exc:
        why = exc.reason
    if why is not None:
        assert why.isprintable(), why
        assert len(why) < 400, why
        # The field part holds only schema names and indices: a bounded metrics label.
        head = re.sub(r"\[(\d+|\.\.\.)\]", "", why.split(": ", 1)[0])
        assert set(head.split(".")) <= FIELD_NAMES | {""}, why
        # Every refusal is explained by a specific check, never by the catch-all.
        assert why != "payload: does not match wire format version 1", payload
        return
    assert isinstance(b, Batch)
    assert b.channels
    assert b.readings == sum(len(c.time) for c in b.channels) <= lim.max_readings
    for c in b.channels:
        assert len(c.time) == len(c.value) == len(c.quality) >= 1
        assert c.time.dtype == np.int64
        assert c.value.dtype == np.float64
        assert c.quality.dtype == np.uint8
        assert int(c.time.min()) >= lim.min_time_us
        assert int(c.time.max()) <= NOW + lim.max_future_us


@FUZZ
@given(payload=st.binary(max_size=512), content_type=content_types, lim=limits)
def test_random_bytes_raise_only_payload_error(
    payload: bytes, content_type: str | None, lim: DecodeLimits
) -> None:
    check_outcome(payload, content_type, lim)


@FUZZ
@given(doc=documents, as_json=st.booleans(), lim=limits)
def test_plausible_documents_raise_only_payload_error(
    doc: Any, as_json: bool, lim: DecodeLimits
) -> None:
    payload = js(doc) if as_json else mp(doc)
    check_outcome(payload, None, lim)


@FUZZ
@given(
    doc=documents,
    as_json=st.booleans(),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    cut=st.integers(0, 10_000),
)
def test_corrupted_documents_raise_only_payload_error(
    doc: Any, as_json: bool, edits: list[tuple[int, int]], cut: int
) -> None:
    data = bytearray(js(doc) if as_json else mp(doc))
    for at, byte in edits:
        data[at % len(data)] = byte
    check_outcome(bytes(data[: max(1, len(data) - cut % 3)]), None, LIMITS)


@FUZZ
@given(
    t0=st.integers(946_684_800_000_000, NOW),
    rows=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c.d"]),
            st.lists(st.floats(width=64), min_size=1, max_size=20),
            st.booleans(),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_valid_batches_round_trip(t0: int, rows: list[tuple[str, list[float], bool]]) -> None:
    wire = [
        ch(name, v=f8(*vals), t=i8(*range(len(vals))))
        if binary
        else ch(name, v=vals, t=list(range(len(vals))))
        for name, vals, binary in rows
    ]
    payloads = [mp(batch(*wire, t0=t0))]
    if not any(binary or not np.isfinite(vals).all() for _, vals, binary in rows):
        payloads.append(js(batch(*wire, t0=t0)))  # JSON has no bin and no NaN/inf
    for payload in payloads:
        b = decode(payload)
        assert b.readings == sum(len(r[1]) for r in rows)
        for c, (name, vals, _) in zip(b.channels, rows, strict=True):
            assert c.name == name
            np.testing.assert_array_equal(c.value, np.array(vals, dtype=np.float64))
            np.testing.assert_array_equal(c.time, t0 + np.arange(len(vals), dtype=np.int64))


@FUZZ
@given(
    t0=st.integers(946_684_800_000_000, NOW),
    dt=st.one_of(st.integers(1, 10**6), st.integers(1, 2**62)),
    n=st.integers(1, 50),
)
def test_dt_times_are_exact(t0: int, dt: int, n: int) -> None:
    limits = DecodeLimits(max_future_us=2**63 - 1 - NOW)
    payload = mp(batch(ch(v=f8(*range(n)), dt=dt), t0=t0))
    expected = [t0 + i * dt for i in range(n)]
    if expected[-1] > 2**63 - 1:
        assert reason(payload, limits=limits).startswith("ch[0].dt: ")
    else:
        c = only(decode(payload, limits=limits))
        np.testing.assert_array_equal(c.time, np.array(expected, dtype=np.int64))
