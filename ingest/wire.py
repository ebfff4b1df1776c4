"""Wire format v1 (docs: the README's "Wire format"): the shapes msgspec decodes into, the
rules names, units and times must meet, and a batch's binary arrays as numpy columns."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Annotated, Final, TypeAlias

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import UNSET, Meta, UnsetType

from ingest.diagnose import excerpt
from ingest.errors import PayloadError

# --------------------------------------------------------------------------------------------
# Wire shapes (decoders are built once, below)
# --------------------------------------------------------------------------------------------

I64_MIN: Final = -(2**63)
I64_MAX: Final = 2**63 - 1

Int64: TypeAlias = Annotated[int, Meta(ge=I64_MIN, le=I64_MAX)]
PositiveInt64: TypeAlias = Annotated[int, Meta(gt=0, le=I64_MAX)]
Quality: TypeAlias = Annotated[int, Meta(ge=0, le=255)]
Seq: TypeAlias = Annotated[int, Meta(ge=0, le=I64_MAX)]  # fits a bigint column
Rfc3339: TypeAlias = Annotated[datetime, Meta(tz=True)]


class MsgpackChannel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    s: str
    v: memoryview | list[float]
    vt: str | UnsetType = UNSET
    dt: PositiveInt64 | UnsetType = UNSET
    t: memoryview | list[Int64] | UnsetType = UNSET
    q: Quality | memoryview | list[Quality] | UnsetType = UNSET
    u: str | UnsetType = UNSET


class MsgpackBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    t0: int
    ch: list[MsgpackChannel]
    seq: Seq | UnsetType = UNSET


class JsonChannel(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    s: str
    v: list[float]
    vt: str | UnsetType = UNSET
    dt: PositiveInt64 | UnsetType = UNSET
    t: list[Int64] | UnsetType = UNSET
    q: Quality | list[Quality] | UnsetType = UNSET
    u: str | UnsetType = UNSET


class JsonObject(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A JSON object: either the batch shape (v, t0, seq, ch) or the single-sample shape."""

    v: int | UnsetType = UNSET
    t0: int | Rfc3339 | UnsetType = UNSET
    seq: Seq | UnsetType = UNSET
    ch: list[JsonChannel] | UnsetType = UNSET
    ts: int | Rfc3339 | UnsetType = UNSET
    values: dict[str, float] | UnsetType = UNSET


class JsonSample(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ts: int | Rfc3339
    values: dict[str, float]


JSON_SCHEMA: Final = JsonObject | list[JsonSample]
MSGPACK_DECODER: Final = msgspec.msgpack.Decoder(MsgpackBatch)
JSON_DECODER: Final = msgspec.json.Decoder(JSON_SCHEMA)

ChannelWire: TypeAlias = MsgpackChannel | JsonChannel

# --------------------------------------------------------------------------------------------
# Small helpers: names, reasons, times
# --------------------------------------------------------------------------------------------

NAME_CHARS: Final = "A-Z a-z 0-9 _ . : -"
NAME_MAX: Final = 64
UNIT_MAX: Final = 32
is_name: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,64}").fullmatch
first_non_blank: Final = re.compile(rb"[^ \t\r\n]").search
F8: Final = np.dtype("<f8")
F4: Final = np.dtype("<f4")
I8: Final = np.dtype("<i8")
JOIN_MAX: Final = 8192  # readings: above it, a batch's bin values are not joined first
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US: Final = timedelta(microseconds=1)


def name_problem(name: str) -> str | None:
    """Why `name` is not a valid sensor name / topic level, or None when it is."""
    if is_name(name):
        return None
    if not name:
        return "is empty"
    if len(name) > NAME_MAX:
        return f"has {len(name)} characters, over the {NAME_MAX}-character limit"
    return f"{excerpt(name)} has a character outside {NAME_CHARS}"


def check_name(field: str, name: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise PayloadError(f"{field}: {problem}")


def check_unit(field: str, unit: str) -> None:
    """Units: 1 to 32 printable characters (str.isprintable), no leading or trailing space."""
    if not unit:
        raise PayloadError(f"{field}: is empty")
    if len(unit) > UNIT_MAX:
        raise PayloadError(
            f"{field}: has {len(unit)} characters, over the {UNIT_MAX}-character limit"
        )
    if not unit.isprintable():
        raise PayloadError(f"{field}: {excerpt(unit)} has a non-printable character")
    if unit[0] == " " or unit[-1] == " ":
        raise PayloadError(f"{field}: {excerpt(unit)} has a leading or trailing space")


def fmt_us(us: int) -> str:
    """RFC 3339 (UTC) rendering of a microsecond timestamp, or the raw number out of range."""
    try:
        moment = EPOCH + timedelta(microseconds=us)
    except OverflowError:
        return f"{us} us since the epoch"
    return moment.replace(tzinfo=None).isoformat() + "Z"


def check_window(field: str, first: int, last: int, window: tuple[int, int]) -> None:
    lo, hi = window
    if first < lo:
        raise PayloadError(
            f"{field}: {fmt_us(first)} is before the accepted window (starts {fmt_us(lo)})"
        )
    if last > hi:
        raise PayloadError(
            f"{field}: {fmt_us(last)} is after the accepted window (ends {fmt_us(hi)})"
        )


def to_us(value: int | datetime) -> int:
    if isinstance(value, datetime):
        return (value - EPOCH) // ONE_US
    return value


# What msgspec raises for bad input: its own errors, and UnicodeDecodeError for a str that is
# not UTF-8 in some releases. The reason is then worked out by ingest.diagnose, never taken
# from the error's text.
DECODE_ERRORS: Final = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


# --------------------------------------------------------------------------------------------
# Columns
# --------------------------------------------------------------------------------------------


def values_column(
    wire: Sequence[ChannelWire], counts: Sequence[int], total: int
) -> npt.NDArray[np.float64]:
    out = np.empty(total, dtype=np.float64)
    at = 0
    for c, n in zip(wire, counts, strict=True):
        v = c.v
        out[at : at + n] = (
            np.frombuffer(v, dtype=F4 if c.vt == "f4" else F8) if isinstance(v, memoryview) else v
        )
        at += n
    return out


def times_column(
    t0: int,
    wire: Sequence[ChannelWire],
    counts: Sequence[int],
    total: int,
    window: tuple[int, int],
) -> npt.NDArray[np.int64]:
    if any(c.t is not UNSET for c in wire):
        out = np.empty(total, dtype=np.int64)
        at = 0
        for i, (c, n) in enumerate(zip(wire, counts, strict=True)):
            channel_times(f"ch[{i}]", c, n, t0, window, out[at : at + n])
            at += n
        return out
    # Regular sampling only: t0 + k * dt within each channel (dt 0 for a single reading).
    dts = [0 if c.dt is UNSET or n == 1 else c.dt for c, n in zip(wire, counts, strict=True)]
    last = max(dt * (n - 1) for dt, n in zip(dts, counts, strict=True))
    if t0 + last > window[1]:  # name the first channel that ends too late
        for i, (dt, n) in enumerate(zip(dts, counts, strict=True)):
            check_window(f"ch[{i}].dt", t0, t0 + dt * (n - 1), window)
    n0, dt0 = counts[0], dts[0]
    if len(set(counts)) == 1 and len(set(dts)) == 1:
        one = np.arange(n0, dtype=np.int64)
        one *= dt0
        one += t0
        out = np.empty(total, dtype=np.int64)
        out.reshape(len(counts), n0)[:] = one
        return out
    lengths = np.array(counts, dtype=np.int64)
    step = np.arange(total, dtype=np.int64)
    step -= np.repeat(np.cumsum(lengths) - lengths, lengths)  # index within its channel
    step *= np.repeat(np.array(dts, dtype=np.int64), lengths)
    step += t0
    return step


def quality_column(
    wire: Sequence[ChannelWire], counts: Sequence[int], total: int
) -> npt.NDArray[np.uint8]:
    out = np.empty(total, dtype=np.uint8)
    at = 0
    for c, n in zip(wire, counts, strict=True):
        q = c.q
        if q is UNSET:
            out[at : at + n] = 0
        elif isinstance(q, memoryview):
            out[at : at + n] = np.frombuffer(q, dtype=np.uint8)
        else:  # one value for all, or a list (checked to be 0..255)
            out[at : at + n] = q
        at += n
    return out


def value_itemsize(field: str, vt: str | UnsetType) -> int:
    if vt is UNSET or vt == "f8":
        return 8
    if vt == "f4":
        return 4
    raise PayloadError(f'{field}.vt: {excerpt(vt)} is not "f8" or "f4"')


def channel_times(
    field: str,
    c: ChannelWire,
    n: int,
    t0: int,
    window: tuple[int, int],
    out: npt.NDArray[np.int64],
) -> None:
    """Write the n absolute times of channel `c` to `out`."""
    t = c.t
    if t is not UNSET:
        offsets = np.frombuffer(t, dtype=I8) if isinstance(t, memoryview) else np.array(t, np.int64)
        # Bounds in Python ints first: t0 + offset cannot overflow once inside the window.
        check_window(f"{field}.t", t0 + int(offsets.min()), t0 + int(offsets.max()), window)
        np.add(offsets, t0, out=out)
        return
    if c.dt is UNSET or n == 1:
        out[:] = t0
        return
    dt = c.dt
    check_window(f"{field}.dt", t0, t0 + dt * (n - 1), window)
    np.multiply(np.arange(n, dtype=np.int64), dt, out=out)
    out += t0
