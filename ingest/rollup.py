"""Numba kernels of the rollups: a flush's partial aggregates per sensor and time bucket, and
partials of several flushes merged (coarser buckets too)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields
from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.jit import kernel

__all__ = [
    "DAY_US",
    "HOUR_US",
    "MINUTE_US",
    "Rollup",
    "compile_kernels",
    "merge_partials",
    "rollup",
]

MINUTE_US: Final = 60_000_000
HOUR_US: Final = 3_600_000_000
DAY_US: Final = 86_400_000_000


@dataclass(frozen=True, slots=True, eq=False)
class Rollup:
    """Partial aggregates of one flush: equal-length columns, one row per (sensor, bucket).

    A row exists for every (sensor, bucket) with at least one non-NaN value in the flush; NaN
    values are left out of every aggregate (infinities count as values). Rows are sorted by
    (sensor, bucket). Partial rows of the same key from other flushes or containers merge
    exactly: least of `min`, greatest of `max`, sum of `sum` and `count`, `first` of the
    earlier `first_time`, `last` of the later `last_time` (the database upsert does this).
    `sum` is a float64 sum, so it is exact up to rounding, which depends on the split.
    """

    sensor: npt.NDArray[np.int32]
    bucket: npt.NDArray[np.int64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    sum: npt.NDArray[np.float64]
    count: npt.NDArray[np.int64]
    first: npt.NDArray[np.float64]
    first_time: npt.NDArray[np.int64]
    last: npt.NDArray[np.float64]
    last_time: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.sensor.shape[0])


ROLLUP_FIELDS: Final = tuple(f.name for f in fields(Rollup))
"""Rollup's columns, in their order."""


@kernel
def _rollup_count(
    sensor: npt.NDArray[np.int32],
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    bucket_us: int,
) -> int:
    """Number of (sensor, bucket) groups with a non-NaN value; -1 - i if row i breaks the order."""
    groups = 0
    have = False
    last_sensor = 0
    last_bucket = 0
    for i in range(sensor.shape[0]):
        s = sensor[i]
        t = time[i]
        if i > 0 and (s < sensor[i - 1] or (s == sensor[i - 1] and t <= time[i - 1])):
            return -1 - i
        x = value[i]
        if x != x:
            continue
        b = t - t % bucket_us
        if not have or s != last_sensor or b != last_bucket:
            groups += 1
            have = True
            last_sensor = s
            last_bucket = b
    return groups


@kernel
def _rollup_fill(
    sensor: npt.NDArray[np.int32],
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    bucket_us: int,
    out_sensor: npt.NDArray[np.int32],
    out_bucket: npt.NDArray[np.int64],
    out_min: npt.NDArray[np.float64],
    out_max: npt.NDArray[np.float64],
    out_sum: npt.NDArray[np.float64],
    out_count: npt.NDArray[np.int64],
    out_first: npt.NDArray[np.float64],
    out_first_time: npt.NDArray[np.int64],
    out_last: npt.NDArray[np.float64],
    out_last_time: npt.NDArray[np.int64],
) -> None:
    """Fill the output columns, sized by `_rollup_count`, in one pass over sorted input."""
    g = -1
    for i in range(sensor.shape[0]):
        x = value[i]
        if x != x:
            continue
        s = sensor[i]
        t = time[i]
        b = t - t % bucket_us
        if g < 0 or s != out_sensor[g] or b != out_bucket[g]:
            g += 1
            out_sensor[g] = s
            out_bucket[g] = b
            out_min[g] = x
            out_max[g] = x
            out_sum[g] = x
            out_count[g] = 1
            out_first[g] = x
            out_first_time[g] = t
        else:
            if x < out_min[g]:
                out_min[g] = x
            if x > out_max[g]:
                out_max[g] = x
            out_sum[g] += x
            out_count[g] += 1
        out_last[g] = x
        out_last_time[g] = t


def rollup(
    *,
    sensor: npt.NDArray[np.int32],
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    bucket_us: int,
) -> Rollup:
    """Aggregate one flush per (sensor, time bucket); never awaits, releases the GIL meanwhile.

    Input columns are sorted by (sensor, time) with (sensor, time) unique; `time` is in
    microseconds since the Unix epoch. A reading at `t` falls in the bucket starting at
    `t - t mod bucket_us` (floor), which for widths that divide a day (1 minute, 1 hour) is
    exactly TimescaleDB's `time_bucket(width, ts)` with its default origin (2000-01-03, a whole
    number of days after the Unix epoch). Raises ValueError on unsorted input or a bad width.
    """
    if isinstance(bucket_us, bool):
        raise TypeError("bucket_us must be an int, got bool")
    bucket_us = operator.index(bucket_us)
    if bucket_us <= 0 or DAY_US % bucket_us != 0:
        raise ValueError(
            f"bucket_us must be a positive divisor of one day ({DAY_US} us) so that buckets "
            f"align like TimescaleDB time_bucket, got {bucket_us}"
        )
    s = np.require(sensor, np.int32, ["C", "W"])
    t = np.require(time, np.int64, ["C", "W"])
    v = np.require(value, np.float64, ["C", "W"])
    if not s.ndim == t.ndim == v.ndim == 1 or not s.shape[0] == t.shape[0] == v.shape[0]:
        raise ValueError("sensor, time and value must be 1-d columns of equal length")
    groups = int(_rollup_count(s, t, v, bucket_us))
    if groups < 0:
        raise ValueError(f"readings are not sorted by (sensor, time) at row {-1 - groups}")
    out = Rollup(
        sensor=np.empty(groups, np.int32),
        bucket=np.empty(groups, np.int64),
        min=np.empty(groups, np.float64),
        max=np.empty(groups, np.float64),
        sum=np.empty(groups, np.float64),
        count=np.empty(groups, np.int64),
        first=np.empty(groups, np.float64),
        first_time=np.empty(groups, np.int64),
        last=np.empty(groups, np.float64),
        last_time=np.empty(groups, np.int64),
    )
    _rollup_fill(
        s,
        t,
        v,
        bucket_us,
        out.sensor,
        out.bucket,
        out.min,
        out.max,
        out.sum,
        out.count,
        out.first,
        out.first_time,
        out.last,
        out.last_time,
    )
    return out


@kernel
def _merge_count(
    order: npt.NDArray[np.int64], sensor: npt.NDArray[np.int32], bucket: npt.NDArray[np.int64]
) -> int:
    """Number of distinct (sensor, bucket) keys, the rows taken in `order` (sorted by key)."""
    groups = 0
    for k in range(order.shape[0]):
        i = order[k]
        if k == 0:
            groups += 1
            continue
        j = order[k - 1]
        if sensor[i] != sensor[j] or bucket[i] != bucket[j]:
            groups += 1
    return groups


@kernel
def _merge_fill(
    order: npt.NDArray[np.int64],
    sensor: npt.NDArray[np.int32],
    bucket: npt.NDArray[np.int64],
    pmin: npt.NDArray[np.float64],
    pmax: npt.NDArray[np.float64],
    psum: npt.NDArray[np.float64],
    pcount: npt.NDArray[np.int64],
    pfirst: npt.NDArray[np.float64],
    pfirst_time: npt.NDArray[np.int64],
    plast: npt.NDArray[np.float64],
    plast_time: npt.NDArray[np.int64],
    out_sensor: npt.NDArray[np.int32],
    out_bucket: npt.NDArray[np.int64],
    out_min: npt.NDArray[np.float64],
    out_max: npt.NDArray[np.float64],
    out_sum: npt.NDArray[np.float64],
    out_count: npt.NDArray[np.int64],
    out_first: npt.NDArray[np.float64],
    out_first_time: npt.NDArray[np.int64],
    out_last: npt.NDArray[np.float64],
    out_last_time: npt.NDArray[np.int64],
) -> None:
    """Merge the partials taken in `order` per (sensor, bucket), as the database upsert does."""
    g = -1
    for k in range(order.shape[0]):
        i = order[k]
        if g < 0 or sensor[i] != out_sensor[g] or bucket[i] != out_bucket[g]:
            g += 1
            out_sensor[g] = sensor[i]
            out_bucket[g] = bucket[i]
            out_min[g] = pmin[i]
            out_max[g] = pmax[i]
            out_sum[g] = psum[i]
            out_count[g] = pcount[i]
            out_first[g] = pfirst[i]
            out_first_time[g] = pfirst_time[i]
            out_last[g] = plast[i]
            out_last_time[g] = plast_time[i]
            continue
        if pmin[i] < out_min[g]:
            out_min[g] = pmin[i]
        if pmax[i] > out_max[g]:
            out_max[g] = pmax[i]
        out_sum[g] += psum[i]
        out_count[g] += pcount[i]
        if pfirst_time[i] < out_first_time[g]:
            out_first[g] = pfirst[i]
            out_first_time[g] = pfirst_time[i]
        if plast_time[i] > out_last_time[g]:
            out_last[g] = plast[i]
            out_last_time[g] = plast_time[i]


def merge_partials(parts: list[Rollup], *, bucket_us: int = MINUTE_US) -> Rollup:
    """Partials of several flushes merged into one row per (sensor, bucket of `bucket_us`),
    sorted by (sensor, bucket): least of `min`, greatest of `max`, sums of `sum` and `count`,
    `first` of the earliest `first_time`, `last` of the latest `last_time`. A coarser
    `bucket_us` than the partials' (1 hour from 1-minute partials) rolls them up into it.
    Partials of one key hold disjoint readings, so no two share a first or last time."""
    if bucket_us <= 0 or DAY_US % bucket_us != 0:
        raise ValueError(f"bucket_us must be a positive divisor of one day, got {bucket_us}")
    cat = Rollup(*(np.concatenate([getattr(p, f) for p in parts]) for f in ROLLUP_FIELDS))
    bucket = cat.bucket - cat.bucket % bucket_us
    # Each part is sorted by key: a stable sort of the concatenation merges sorted runs.
    order = np.lexsort((bucket, cat.sensor)).astype(np.int64)
    groups = int(_merge_count(order, cat.sensor, bucket))
    out = Rollup(*(np.empty(groups, getattr(cat, f).dtype) for f in ROLLUP_FIELDS))
    _merge_fill(
        order,
        cat.sensor,
        bucket,
        *(getattr(cat, f) for f in ROLLUP_FIELDS[2:]),
        *(getattr(out, f) for f in ROLLUP_FIELDS),
    )
    return out


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernels (see `ingest.warmup`)."""
    sensor = np.array([1, 1, 2], np.int32)
    time = np.array([0, MINUTE_US, 5], np.int64)
    value = np.array([1.0, np.nan, 2.0])
    for width in (MINUTE_US, HOUR_US):
        rollup(sensor=sensor, time=time, value=value, bucket_us=width)
    part = rollup(sensor=sensor, time=time, value=value, bucket_us=MINUTE_US)
    merge_partials([part, part], bucket_us=HOUR_US)
