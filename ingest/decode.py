"""Decode stage: one MQTT payload (MessagePack or JSON, wire format v1) into numpy columns."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import cast

import msgspec
import numpy as np
import numpy.typing as npt
from msgspec import UNSET

from ingest.diagnose import diagnose, excerpt
from ingest.errors import PayloadError
from ingest.wire import (
    DECODE_ERRORS,
    F8,
    I64_MAX,
    JOIN_MAX,
    JSON_DECODER,
    JSON_SCHEMA,
    MSGPACK_DECODER,
    UNIT_MAX,
    ChannelWire,
    MsgpackBatch,
    check_name,
    check_unit,
    check_window,
    first_non_blank,
    is_name,
    name_problem,
    quality_column,
    times_column,
    to_us,
    value_itemsize,
    values_column,
)

__all__ = ["Batch", "Channel", "DecodeLimits", "decode_batch", "parse_topic"]

# --------------------------------------------------------------------------------------------
# Public types
# --------------------------------------------------------------------------------------------


class DecodeLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Limits a payload must respect; every field must be a positive int."""

    max_payload_bytes: int = 1_048_576
    max_readings: int = 1_000_000
    min_time_us: int = 946_684_800_000_000  # 2000-01-01T00:00:00Z
    max_future_us: int = 86_400_000_000  # one day after the ingester's clock

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Channel(msgspec.Struct, frozen=True, eq=False):
    """The readings of one sensor: three C-contiguous arrays of equal length (>= 1), views of
    its batch's columns.

    `eq=False`: channels compare by identity (element-wise array equality has no truth value).
    """

    name: str
    unit: str | None
    time: npt.NDArray[np.int64]  # absolute microseconds since the Unix epoch, UTC
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]


class Batch(msgspec.Struct, frozen=True, eq=False):
    """One decoded payload: at least one channel. A sensor name may occur in several channels.

    `time`, `value` and `quality` hold every reading, channel after channel, in three owned
    arrays that share no memory with the payload. Channel i is `names[i]` (unit `units[i]`)
    with `counts[i]` readings; `channels` gives them as `Channel` views of the columns. The
    hot path reads the tuples and columns only: a plant's message of twenty one-sample
    channels then costs no Python object per channel.
    """

    seq: int | None
    names: tuple[str, ...]
    units: tuple[str | None, ...]
    counts: tuple[int, ...]
    readings: int  # total readings over all channels
    time: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    quality: npt.NDArray[np.uint8]

    @property
    def channels(self) -> tuple[Channel, ...]:
        """Every channel, its arrays views of the batch's columns (made at each call)."""
        channels = []
        at = 0
        for name, unit, n in zip(self.names, self.units, self.counts, strict=True):
            end = at + n
            channels.append(
                Channel(name, unit, self.time[at:end], self.value[at:end], self.quality[at:end])
            )
            at = end
        return tuple(channels)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def parse_topic(topic: str, *, prefix: str) -> tuple[str, ...]:
    """Levels after the prefix: the asset levels then the device id as last element (at least one).

    Pure; never awaits. `prefix` may hold several levels (`plant/telemetry`); a trailing `/` on
    it is ignored, and an empty prefix means the whole topic is levels. Every level must have
    1 to 64 characters from `A-Z a-z 0-9 _ . : -`. Raises PayloadError('topic: ...') naming what
    is wrong (not under the prefix, empty level, bad character, too long).
    """
    base = prefix.rstrip("/")
    rest = topic
    if base:
        if not topic.startswith(base + "/"):
            raise PayloadError(
                f"topic: {excerpt(topic, 128)} is not under the prefix {excerpt(base, 128)}"
            )
        rest = topic[len(base) + 1 :]
    if not rest:
        raise PayloadError("topic: no device id after the prefix")
    levels = tuple(rest.split("/"))
    for number, level in enumerate(levels, 1):
        problem = name_problem(level)
        if problem is not None:
            raise PayloadError(f"topic: level {number} after the prefix {problem}")
    return levels


def decode_batch(
    payload: bytes, *, content_type: str | None, limits: DecodeLimits, now_us: int
) -> Batch:
    """Decode one payload into a Batch of per-sensor columns.

    Pure and synchronous (never awaits; safe to call from any thread). Raises only PayloadError,
    whose reason is one line naming the offending field. The result shares no memory with
    `payload`. Decisions where the wire format leaves room:

    - Encoding: content type `application/msgpack` or `application/json` (parameters ignored,
      case-insensitive); any other one is rejected; absent or blank means sniff the first
      non-blank byte (`{` or `[` is JSON, anything else MessagePack).
    - Optional keys may be omitted but not sent as nil/null.
    - `vt` must be "f8" or "f4"; it is checked but has no effect when `v` is an array of numbers.
    - `dt` and `t` together are rejected; `dt` with one value is allowed. `t` offsets may be
      negative: every absolute time (and `t0` itself) must lie in [min_time_us,
      now_us + max_future_us], both ends inclusive.
    - `u`: 1 to 32 printable characters (str.isprintable, so the only space allowed is U+0020),
      not starting or ending with a space. Channels naming the same sensor may repeat, but
      must not state different units.
    - JSON: `t0`/`ts` is int microseconds or an RFC 3339 string with `Z` or an offset (digits
      beyond microseconds are rounded by msgspec). A top-level JSON object is either the batch
      shape (v, t0, seq, ch) or the single-sample shape (ts, values), never a mix of their keys.
      A top-level JSON array holds only single-sample objects (at least one); the whole array
      is one batch without `seq`, with one channel per sensor name in order of first
      appearance, its readings in array order. `values` must not be empty.
    """
    size = len(payload)
    if size > limits.max_payload_bytes:
        raise PayloadError(
            f"payload: {size} bytes exceeds the {limits.max_payload_bytes}-byte limit"
        )
    if size == 0:
        raise PayloadError("payload: is empty")
    json = _is_json(payload, content_type)
    window = (limits.min_time_us, min(now_us + limits.max_future_us, I64_MAX))
    if json:
        return _decode_json(payload, limits, window)
    return _decode_msgpack(payload, limits, window)


# --------------------------------------------------------------------------------------------
# Implementation
# --------------------------------------------------------------------------------------------


def _is_json(payload: bytes, content_type: str | None) -> bool:
    if content_type is not None:
        kind = content_type.partition(";")[0].strip().lower()
        if kind == "application/json":
            return True
        if kind == "application/msgpack":
            return False
        if kind:
            raise PayloadError(
                f"content-type: {excerpt(content_type)} is not application/msgpack"
                " or application/json"
            )
    first = first_non_blank(payload)
    if first is None:
        raise PayloadError("payload: holds only whitespace")
    return first[0] in (b"{", b"[")


def _decode_msgpack(payload: bytes, limits: DecodeLimits, window: tuple[int, int]) -> Batch:
    try:
        wire = MSGPACK_DECODER.decode(payload)
    except DECODE_ERRORS as exc:
        raise diagnose(payload, MsgpackBatch, json=False) from exc
    if wire.v != 1:
        raise PayloadError(f"v: unsupported format version {wire.v}")
    seq = None if wire.seq is UNSET else wire.seq
    return _decode_channels(wire.t0, seq, wire.ch, limits, window)


def _decode_json(payload: bytes, limits: DecodeLimits, window: tuple[int, int]) -> Batch:
    try:
        wire = JSON_DECODER.decode(payload)
    except DECODE_ERRORS as exc:
        raise diagnose(payload, JSON_SCHEMA, json=True) from exc
    if isinstance(wire, list):
        if not wire:
            raise PayloadError("payload: empty JSON array; at least one sample is required")
        return _decode_samples(
            [(f"[{k}].", s.ts, s.values) for k, s in enumerate(wire)], limits, window
        )
    batch_keys = [k for k in ("v", "t0", "seq", "ch") if getattr(wire, k) is not UNSET]
    sample_keys = [k for k in ("ts", "values") if getattr(wire, k) is not UNSET]
    if sample_keys:
        if batch_keys:
            raise PayloadError(
                f"payload: mixes batch keys ({', '.join(batch_keys)}) with single-sample keys"
                f" ({', '.join(sample_keys)})"
            )
        if wire.ts is UNSET:
            raise PayloadError("ts: missing required field")
        if wire.values is UNSET:
            raise PayloadError("values: missing required field")
        return _decode_samples([("", wire.ts, wire.values)], limits, window)
    if wire.v is UNSET:
        raise PayloadError("v: missing required field")
    if wire.v != 1:
        raise PayloadError(f"v: unsupported format version {wire.v}")
    if wire.t0 is UNSET:
        raise PayloadError("t0: missing required field")
    if wire.ch is UNSET:
        raise PayloadError("ch: missing required field")
    seq = None if wire.seq is UNSET else wire.seq
    return _decode_channels(to_us(wire.t0), seq, wire.ch, limits, window)


def _decode_channels(
    t0: int,
    seq: int | None,
    wire: Sequence[ChannelWire],
    limits: DecodeLimits,
    window: tuple[int, int],
) -> Batch:
    check_window("t0", t0, t0, window)
    if not wire:
        raise PayloadError("ch: is empty; at least one channel is required")

    # Pass 1: every check that needs no array, and the reading count, before any allocation.
    counts: list[int] = []
    units: dict[str, tuple[str, int]] = {}
    total = 0
    plain = True  # float64 bin values, regular times, no quality: the usual shape
    for i, c in enumerate(wire):
        # The common case is checked inline; a field's name is only built for an error.
        name = c.s
        if not is_name(name):
            check_name(f"ch[{i}].s", name)
        u = c.u
        if u is not UNSET:
            if not (u and len(u) <= UNIT_MAX and u.isprintable() and u[0] != " " != u[-1]):
                check_unit(f"ch[{i}].u", u)
            seen = units.setdefault(name, (u, i))
            if seen[0] != u:
                raise PayloadError(
                    f"ch[{i}].u: {excerpt(u)} differs from {excerpt(seen[0])}"
                    f" given for the same sensor in ch[{seen[1]}]"
                )
        vt = c.vt
        itemsize = 8 if vt is UNSET or vt == "f8" else value_itemsize(f"ch[{i}]", vt)
        v = c.v
        nbytes = -1
        if isinstance(v, memoryview):
            nbytes = v.nbytes
            if nbytes % itemsize:
                raise PayloadError(f"ch[{i}].v: length {nbytes} is not a multiple of {itemsize}")
            n = nbytes // itemsize
        else:
            n = len(v)
        if n == 0:
            raise PayloadError(f"ch[{i}].v: is empty; at least one value is required")
        t = c.t
        if t is not UNSET:
            if c.dt is not UNSET:
                raise PayloadError(f"ch[{i}].t: not allowed together with dt")
            if isinstance(t, memoryview):
                if t.nbytes % 8:
                    raise PayloadError(f"ch[{i}].t: length {t.nbytes} is not a multiple of 8")
                nt = t.nbytes // 8
            else:
                nt = len(t)
            if nt != n:
                raise PayloadError(f"ch[{i}].t: {nt} offsets for {n} values")
        elif c.dt is UNSET and n != 1:
            raise PayloadError(f"ch[{i}].dt: one of dt or t is required for {n} values")
        q = c.q
        plain = plain and nbytes >= 0 and itemsize == 8 and t is UNSET and q is UNSET
        if q is not UNSET and not isinstance(q, int):
            nq = q.nbytes if isinstance(q, memoryview) else len(q)
            if nq != n:
                raise PayloadError(f"ch[{i}].q: {nq} quality values for {n} values")
        counts.append(n)
        total += n
    if total > limits.max_readings:
        raise PayloadError(f"ch: {total} readings exceed the {limits.max_readings}-reading limit")

    # Pass 2: the batch's columns; one copy of each bin field, no Python object per reading.
    if plain:
        views = cast("list[memoryview]", [c.v for c in wire])
        if total <= JOIN_MAX:  # one join and one conversion cost least
            value = np.frombuffer(b"".join(views), dtype=F8).astype(np.float64)
        else:  # no temporary copy: a large one is returned to the system and faulted in again
            value = np.concatenate([np.frombuffer(v, dtype=F8) for v in views], dtype=np.float64)
        quality = np.zeros(total, dtype=np.uint8)
    else:
        value = values_column(wire, counts, total)
        quality = quality_column(wire, counts, total)
    if plain and total == len(wire):  # one reading per channel, all at t0 (checked above)
        time = np.full(total, t0, dtype=np.int64)
    else:
        time = times_column(t0, wire, counts, total, window)
    return Batch(
        seq,
        tuple([c.s for c in wire]),
        tuple([None if c.u is UNSET else c.u for c in wire]),
        tuple(counts),
        total,
        time,
        value,
        quality,
    )


def _decode_samples(
    samples: Sequence[tuple[str, int | datetime, dict[str, float]]],
    limits: DecodeLimits,
    window: tuple[int, int],
) -> Batch:
    """The single-sample shape (and arrays of it): one channel per sensor, in first-seen order."""
    total = 0
    for where, _, values in samples:
        if not values:
            raise PayloadError(f"{where}values: is empty; at least one reading is required")
        total += len(values)
    if total > limits.max_readings:
        raise PayloadError(
            f"payload: {total} readings exceed the {limits.max_readings}-reading limit"
        )
    columns: dict[str, tuple[list[int], list[float]]] = {}
    for where, ts, values in samples:
        at = to_us(ts)
        check_window(f"{where}ts", at, at, window)
        for name, value in values.items():
            column = columns.get(name)
            if column is None:
                problem = name_problem(name)
                if problem is not None:
                    raise PayloadError(f"{where}values: sensor name {problem}")
                column = columns[name] = ([], [])
            column[0].append(at)
            column[1].append(value)
    names = tuple(columns)
    return Batch(
        None,
        names,
        (None,) * len(names),
        tuple([len(columns[name][0]) for name in names]),
        total,
        np.array([t for name in names for t in columns[name][0]], dtype=np.int64),
        np.array([v for name in names for v in columns[name][1]], dtype=np.float64),
        np.zeros(total, dtype=np.uint8),
    )
