"""The compact form of a wire-format payload, byte by byte: where a MessagePack payload's t0,
seq and value bytes lie (`walk`), and which of its bytes every payload of its shape repeats
(`layout`). `ingest.shapes` learns a topic's shape from them."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ingest.jit import small_kernel

__all__ = ["INT_SIZES", "Span", "compile_kernels", "int_size", "layout", "read_int", "walk"]

Span = tuple[int, int]

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


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernels (see `ingest.warmup`)."""
    walk(np.frombuffer(bytes(16), np.uint8))  # read-only, as a payload's bytes are
    layout(16, np.array([0, 1, -1, -1, 8, 16], np.int64))
