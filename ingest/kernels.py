"""Numba kernels of the hot path: gathering a flush, checking its order, its binary COPY rows.
The rollups' kernels are in ``ingest.rollup``."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.jit import kernel
from ingest.rollup import MINUTE_US

__all__ = ["check_sorted", "compile_kernels", "copy_rows", "gather", "swap_bytes64"]


@kernel
def check_sorted(sensor: npt.NDArray[np.int32], time: npt.NDArray[np.int64]) -> int:
    """-1 if sorted by (sensor, time) with unique keys, else the first offending row."""
    for i in range(1, sensor.shape[0]):
        if sensor[i] < sensor[i - 1] or (sensor[i] == sensor[i - 1] and time[i] <= time[i - 1]):
            return i
    return -1


@kernel
def gather(
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    quality: npt.NDArray[np.uint8],
    starts: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    sensors: npt.NDArray[np.int32],
) -> Any:
    """Columns (time, sensor, value, quality) of the runs time[starts[p] : starts[p] +
    lengths[p]] (and the same of value and quality), in the order of p, each run's sensor
    column filled with sensors[p]."""
    n = 0
    for p in range(starts.shape[0]):
        n += lengths[p]
    out_time = np.empty(n, np.int64)
    out_sensor = np.empty(n, np.int32)
    out_value = np.empty(n, np.float64)
    out_quality = np.empty(n, np.uint8)
    k = 0
    for p in range(starts.shape[0]):
        s = starts[p]
        sid = sensors[p]
        for j in range(s, s + lengths[p]):
            out_time[k] = time[j]
            out_sensor[k] = sid
            out_value[k] = value[j]
            out_quality[k] = quality[j]
            k += 1
    return out_time, out_sensor, out_value, out_quality


@kernel
def swap_bytes64(x: np.uint64) -> np.uint64:
    """`x` with its bytes in reverse order (big-endian <-> little-endian)."""
    m8, m16 = np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF)
    x = ((x & m8) << np.uint64(8)) | ((x >> np.uint64(8)) & m8)
    x = ((x & m16) << np.uint64(16)) | ((x >> np.uint64(16)) & m16)
    return (x << np.uint64(32)) | (x >> np.uint64(32))


@kernel
def copy_rows(
    out: npt.NDArray[np.uint64],
    time: npt.NDArray[np.int64],
    sensor: npt.NDArray[np.int32],
    value_bits: npt.NDArray[np.uint64],
    quality: npt.NDArray[np.uint8],
    time_offset: int,
) -> None:
    """PostgreSQL binary COPY tuples (time int8, sensor_id int4, value float8, quality int2)
    into `out`, five 64-bit words (40 bytes) per row, on a little-endian machine: each row is
    its field count, then each field's length and big-endian value. `value_bits` is the
    float64 values' bit patterns; `time_offset` is subtracted from every time."""
    # Byte layout of a row: 0 field count 4 (2 bytes), 2 length 8, 6 time, 14 length 4,
    # 18 sensor, 22 length 8, 26 value, 34 length 2, 38 quality. A word written holds its
    # bytes lowest first, so big-endian fields go in byte-swapped.
    len8, len4, len2 = np.uint64(0x08000000), np.uint64(0x04000000), np.uint64(0x02000000)
    w0 = np.uint64(0x0400) | (len8 << np.uint64(16))
    w1 = (len4 & np.uint64(0xFFFF)) << np.uint64(48)
    w2 = (len4 >> np.uint64(16)) | ((len8 & np.uint64(0xFFFF)) << np.uint64(48))
    w3 = len8 >> np.uint64(16)
    w4 = len2 << np.uint64(16)
    for i in range(time.shape[0]):
        t = swap_bytes64(np.uint64(time[i] - time_offset))
        s = swap_bytes64(np.uint64(np.uint32(sensor[i]))) >> np.uint64(32)
        v = swap_bytes64(value_bits[i])
        k = 5 * i
        out[k] = w0 | (t << np.uint64(48))
        out[k + 1] = (t >> np.uint64(16)) | w1
        out[k + 2] = w2 | (s << np.uint64(16))
        out[k + 3] = w3 | (v << np.uint64(16))
        out[k + 4] = (v >> np.uint64(48)) | w4 | (np.uint64(quality[i]) << np.uint64(56))


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernels (see `ingest.warmup`)."""
    sensor = np.array([1, 1, 2], np.int32)
    time = np.array([0, MINUTE_US, 5], np.int64)
    value = np.array([1.0, np.nan, 2.0])
    starts, lengths = np.array([1, 0], np.int64), np.array([2, 1], np.int64)
    columns = gather(time, value, np.zeros(3, np.uint8), starts, lengths, sensor[:2])
    check_sorted(columns[1], columns[0])
    copy_rows(
        np.empty(15, np.uint64), time, sensor, value.view(np.uint64), np.zeros(3, np.uint8), 1
    )
