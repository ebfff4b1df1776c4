"""The compact form of a wire-format payload, byte by byte: where a MessagePack payload's t0,
seq and value bytes lie (`walk`), and which of its bytes every payload of its shape repeats
(`layout`). `ingest.shapes` learns a topic's shape from them."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ingest.jit import small_kernel

__all__ = [
    "INT_SIZES",
    "SAFE",
    "Span",
    "compile_kernels",
    "int_at",
    "int_size",
    "layout",
    "learnt",
    "read_int",
    "walk",
]

Span = tuple[int, int]

SAFE = 1 << 62
"""Times and offsets within this in magnitude: their sums do not overflow int64."""

INT_SIZES = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}


def read_int(payload: bytes, span: Span) -> int | None:
    """The MessagePack integer at `span`, if it is one of exactly that length."""
    start, end = span
    first = payload[start]
    if end - start == 1:
        if first < 0x80:
            return first
        return first - 256 if first >= 0xE0 else None
    if INT_SIZES.get(first) != end - start:
        return None
    return int.from_bytes(payload[start + 1 : end], "big", signed=first >= 0xD0)


@small_kernel
def _length(
    buf: npt.NDArray[np.uint8], at: int, fix: int, mask: int, c1: int, c2: int, c4: int
) -> tuple[int, int]:
    """(length, position after it) of the map, array or string header at `at`: its fix form
    (`fix` | n, n <= `mask`), or code c1, c2 or c4 with 1, 2 or 4 length bytes (-1: none).
    (-1, at) if it is none of those or runs past the end."""
    if at >= buf.shape[0]:
        return -1, at
    b = buf[at]
    if b & (0xFF ^ mask) == fix:
        return b & mask, at + 1
    size = 1 if b == c1 else 2 if b == c2 else 4 if b == c4 else 0
    if size == 0 or at + 1 + size > buf.shape[0]:
        return -1, at
    n = 0
    for k in range(size):
        n = n * 256 + buf[at + 1 + k]
    return n, at + 1 + size


@small_kernel
def int_size(first: int) -> int:
    """Bytes of the MessagePack integer whose first byte is `first` (`INT_SIZES`, 1 for a
    fixint), or 0 if it starts no integer."""
    if first < 0x80 or first >= 0xE0:
        return 1
    if first == 0xCC or first == 0xD0:
        return 2
    if first == 0xCD or first == 0xD1:
        return 3
    if first == 0xCE or first == 0xD2:
        return 5
    if first == 0xCF or first == 0xD3:
        return 9
    return 0


@small_kernel
def _int_end(buf: npt.NDArray[np.uint8], at: int) -> int:
    """End of the MessagePack integer at `at`, or -1."""
    if at >= buf.shape[0]:
        return -1
    size = int_size(buf[at])
    if size == 0 or at + size > buf.shape[0]:
        return -1
    return at + size


@small_kernel
def int_at(buf: npt.NDArray[np.uint8], a: int, b: int) -> tuple[bool, int]:
    """(True, value) if buf[a:b] is one MessagePack integer within int64 of exactly that
    length (as `read_int` reads it), else (False, 0)."""
    first = buf[a]
    n = b - a
    if int_size(first) != n:
        return False, 0
    if n == 1:
        return True, int(first) if first < 0x80 else int(first) - 256
    if first == 0xCF and buf[a + 1] >= 0x80:
        return False, 0  # above int64
    value = np.uint64(0)
    for k in range(a + 1, b):
        value = (value << np.uint64(8)) | np.uint64(buf[k])
    signed = np.int64(value)  # two's complement for 0xD3
    if 0xD0 <= first <= 0xD2 and buf[a + 1] >= 0x80:
        signed -= np.int64(1) << np.int64(8 * (n - 1))
    return True, int(signed)


@small_kernel
def _is(buf: npt.NDArray[np.uint8], at: int, n: int, a: int, b: int, c: int) -> bool:
    """Whether the n-byte string at `at` is the key of bytes a, b, c (b, c 0: shorter)."""
    size = 1 + (b != 0) + (c != 0)
    if n != size or buf[at] != a:
        return False
    if size >= 2 and buf[at + 1] != b:
        return False
    return not (size == 3 and buf[at + 2] != c)


@small_kernel
def walk(buf: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
    """Spans of t0, seq (-1, -1 without) and every channel's value bytes, flat, if the payload
    has the compact form (a map of v, t0, seq, ch; channels of s, u, dt, vt "f8" and binary
    v only); an empty array otherwise."""
    fail = np.empty(0, np.int64)
    end = buf.shape[0]
    keys, at = _length(buf, 0, 0x80, 0x0F, -1, 0xDE, 0xDF)
    if keys < 0:
        return fail
    out = np.full(4, -1, np.int64)
    spans = np.empty(0, np.int64)
    for _ in range(keys):
        n, at = _length(buf, at, 0xA0, 0x1F, 0xD9, 0xDA, 0xDB)
        if n < 0 or at + n > end:
            return fail
        k = at
        at += n
        if _is(buf, k, n, 118, 0, 0) or _is(buf, k, n, 116, 48, 0) or _is(buf, k, n, 115, 101, 113):
            stop = _int_end(buf, at)  # v, t0, seq
            if stop < 0:
                return fail
            if n == 2:
                out[0], out[1] = at, stop
            elif n == 3:
                out[2], out[3] = at, stop
            at = stop
        elif _is(buf, k, n, 99, 104, 0):  # ch
            channels, at = _length(buf, at, 0x90, 0x0F, -1, 0xDC, 0xDD)
            if channels < 0:
                return fail
            spans = np.full(2 * channels, -1, np.int64)
            for c in range(channels):
                fields, at = _length(buf, at, 0x80, 0x0F, -1, 0xDE, 0xDF)
                if fields < 0:
                    return fail
                for _ in range(fields):
                    m, at = _length(buf, at, 0xA0, 0x1F, 0xD9, 0xDA, 0xDB)
                    if m < 0 or at + m > end:
                        return fail
                    f = at
                    at += m
                    if _is(buf, f, m, 115, 0, 0) or _is(buf, f, m, 117, 0, 0):  # s, u
                        size, at = _length(buf, at, 0xA0, 0x1F, 0xD9, 0xDA, 0xDB)
                        if size < 0:
                            return fail
                        at += size
                    elif _is(buf, f, m, 118, 116, 0):  # vt: "f8" only
                        if at + 3 > end or buf[at] != 0xA2 or buf[at + 1] != 102:
                            return fail
                        if buf[at + 2] != 56:
                            return fail
                        at += 3
                    elif _is(buf, f, m, 100, 116, 0):  # dt
                        at = _int_end(buf, at)
                        if at < 0:
                            return fail
                    elif _is(buf, f, m, 118, 0, 0):  # v, binary
                        if at >= end:
                            return fail
                        b = buf[at]
                        size = 1 if b == 0xC4 else 2 if b == 0xC5 else 4 if b == 0xC6 else 0
                        if size == 0 or at + 1 + size > end:
                            return fail
                        length = 0
                        for j in range(size):
                            length = length * 256 + buf[at + 1 + j]
                        at += 1 + size
                        spans[2 * c], spans[2 * c + 1] = at, at + length
                        at += length
                    else:
                        return fail
                    if at > end:
                        return fail
                if spans[2 * c] < 0:
                    return fail
        else:
            return fail
    if out[0] < 0 or at != end or spans.shape[0] == 0:
        return fail
    return np.concatenate((out, spans))


@small_kernel
def layout(
    size: int, found: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int32]]:
    """For the spans `walk` found in a payload of `size` bytes: the mask of the bytes a
    payload of its shape must repeat (0xff; 0 in t0, seq and values), and the position of
    every value byte, in order."""
    fixed = np.full(size, 0xFF, np.uint8)
    for k in (0, 2):
        if found[k] >= 0:
            fixed[found[k] : found[k + 1]] = 0
    total = 0
    for k in range(4, found.shape[0], 2):
        total += found[k + 1] - found[k]
    values = np.empty(total, np.int32)
    at = 0
    for k in range(4, found.shape[0], 2):
        for p in range(found[k], found[k + 1]):
            fixed[p] = 0
            values[at] = p
            at += 1
    return fixed, values


@small_kernel
def learnt(
    buf: npt.NDArray[np.uint8],
    counts: npt.NDArray[np.int64],
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.uint8],
    seq: int,
    lo: int,
    hi: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8], npt.NDArray[np.int64], int, int]:
    """A decoded payload's shape, in one call: the spans `walk` finds (t0, seq, values; empty
    if the payload has no shape of its own), the mask of `layout`, its readings' times minus
    t0, and the least and greatest of those. It has one when it has the compact form, its
    channels' value bytes are the decoded `counts` and `value` (float64 bytes), its seq the
    decoded `seq` (-1: none; never negative else), and the times it gives are `time`, within
    `lo` and `hi`."""
    none = (np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.int64), 0, 0)
    found = walk(buf)
    channels = counts.shape[0]
    if found.shape[0] != 4 + 2 * channels:
        return none
    for c in range(channels):
        if found[5 + 2 * c] - found[4 + 2 * c] != 8 * counts[c]:
            return none
    valid, t0 = int_at(buf, found[0], found[1])
    if not valid or t0 > hi or abs(t0) >= SAFE:
        return none
    if found[2] >= 0:
        got, s = int_at(buf, found[2], found[3])
        if not got or s < 0 or s != seq:
            return none
    elif seq != -1:
        return none
    fixed, values = layout(buf.shape[0], found)
    if values.shape[0] != value.shape[0]:
        return none
    for i in range(values.shape[0]):
        if buf[values[i]] != value[i]:
            return none
    if time.shape[0] == 0:
        return none
    offsets = np.empty(time.shape[0], np.int64)
    first = last = time[0] - t0
    for i in range(time.shape[0]):
        d = time[i] - t0
        if abs(time[i]) >= SAFE or abs(d) >= SAFE or time[i] < lo or time[i] > hi:
            return none
        offsets[i] = d
        first = min(first, d)
        last = max(last, d)
    return found, fixed, offsets, first, last


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernels (see `ingest.warmup`)."""
    walk(np.frombuffer(bytes(16), np.uint8))  # read-only, as a payload's bytes are
    layout(16, np.array([0, 1, -1, -1, 8, 16], np.int64))
    one = np.ones(1, np.int64)
    learnt(np.frombuffer(bytes(16), np.uint8), one, one, np.zeros(8, np.uint8), -1, 0, 1)
