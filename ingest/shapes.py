"""Message shapes: a device that sends the same channels every second sends MessagePack
payloads that differ only in `t0`, `seq` and the bytes of their values. The first two
payloads of a topic are decoded in full (`ingest.decode`), the second one becoming the
topic's shape; the next ones of the same shape are checked byte for byte against it and
decoded from their bytes, without a Python object per channel.

Anything else (another length, another byte outside those fields, JSON, arrays of numbers,
explicit times or quality) is decoded in full, as always, and becomes the topic's shape if it
has the usual compact form. Called from one task only."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.decode import Batch, DecodeLimits, decode_batch, parse_topic
from ingest.jit import small_kernel
from ingest.wire import I64_MAX

__all__ = ["Shapes", "compile_kernels"]

_MAX_TOPICS = 200_000  # shapes remembered; past that the cache starts again
Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Shape:
    levels: tuple[str, ...]
    payload: npt.NDArray[np.uint8]  # the payload it was learnt from (read-only, its bytes)
    fixed: npt.NDArray[np.uint8]  # 0xff where a byte must equal it, 0 in t0, seq and values
    t0: Span
    seq: Span | None
    values: npt.NDArray[np.int32]  # the value bytes, 8 per reading, in order
    offsets: npt.NDArray[np.int64]  # each reading's time minus t0
    first: int  # least and greatest offset
    last: int
    names: tuple[str, ...]  # shared by every batch of the shape, as are units, counts
    units: tuple[str | None, ...]
    counts: tuple[int, ...]
    quality: npt.NDArray[np.uint8]  # zeros, read-only, shared too


class Shapes:
    """Decodes the payloads of each topic, remembering the topic's levels and shape."""

    def __init__(self, *, prefix: str) -> None:
        self._prefix = prefix
        self._topics: dict[str, _Shape | tuple[str, ...]] = {}
        self.matched = 0
        """Payloads decoded by their topic's shape."""

    def decode(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str | None,
        limits: DecodeLimits,
        now_us: int,
    ) -> tuple[tuple[str, ...], Batch]:
        """The topic's levels and the payload's batch; raises PayloadError like
        `parse_topic` and `decode_batch`."""
        known = self._topics.get(topic)
        if isinstance(known, _Shape):
            if content_type is None or content_type == "application/msgpack":
                batch = _decode_like(known, payload, limits, now_us)
                if batch is not None:
                    self.matched += 1
                    return known.levels, batch
            levels = known.levels
        elif known is None:
            levels = parse_topic(topic, prefix=self._prefix)
        else:
            levels = known
        batch = decode_batch(payload, content_type=content_type, limits=limits, now_us=now_us)
        if known is None:
            # A topic's shape is learnt from its second payload: the first sight of a plant
            # (every sensor registered at once) does not pay for it as well.
            if len(self._topics) >= _MAX_TOPICS:
                self._topics.clear()
            self._topics[topic] = levels
        else:
            self._topics[topic] = _learn(levels, payload, batch, limits, now_us) or levels
        return levels, batch


@small_kernel
def _values_like(
    buf: npt.NDArray[np.uint8],
    payload: npt.NDArray[np.uint8],
    fixed: npt.NDArray[np.uint8],
    values: npt.NDArray[np.int32],
    offsets: npt.NDArray[np.int64],
    t0: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """The little-endian float64 values at `values` (8 bytes each) of `buf` and the times
    t0 + `offsets`, if every byte `fixed` marks equals `payload`'s; else two empty arrays."""
    n = buf.shape[0]
    if n != payload.shape[0]:
        return np.empty(0, np.float64), np.empty(0, np.int64)
    for i in range(n):
        if (buf[i] ^ payload[i]) & fixed[i]:
            return np.empty(0, np.float64), np.empty(0, np.int64)
    raw = np.empty(values.shape[0], np.uint8)
    for k in range(values.shape[0]):
        raw[k] = buf[values[k]]
    time = np.empty(offsets.shape[0], np.int64)
    for k in range(offsets.shape[0]):
        time[k] = offsets[k] + t0
    return raw.view(np.float64).copy(), time


def _decode_like(shape: _Shape, payload: bytes, limits: DecodeLimits, now_us: int) -> Batch | None:
    """`payload` decoded by its shape, or None if it does not have that shape exactly."""
    if len(payload) != len(shape.payload):
        return None
    t0 = _int(payload, shape.t0)
    if t0 is None:
        return None
    seq = None
    if shape.seq is not None:
        seq = _int(payload, shape.seq)
        if seq is None or not 0 <= seq <= I64_MAX:
            return None
    hi = min(now_us + limits.max_future_us, I64_MAX)
    if t0 + shape.first < limits.min_time_us or t0 + shape.last > hi or t0 > hi:
        return None  # decode_batch names the field
    buf = np.frombuffer(payload, np.uint8)
    value, time = _values_like(buf, shape.payload, shape.fixed, shape.values, shape.offsets, t0)
    if not len(value):
        return None
    return Batch(seq, shape.names, shape.units, shape.counts, len(time), time, value, shape.quality)


_INT_SIZES = {0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}


def _int(payload: bytes, span: Span) -> int | None:
    """The MessagePack integer at `span`, if it is one of exactly that length."""
    start, end = span
    first = payload[start]
    if end - start == 1:
        if first < 0x80:
            return first
        return first - 256 if first >= 0xE0 else None
    if _INT_SIZES.get(first) != end - start:
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
def _int_end(buf: npt.NDArray[np.uint8], at: int) -> int:
    """End of the MessagePack integer at `at`, or -1."""
    if at >= buf.shape[0]:
        return -1
    b = buf[at]
    if b < 0x80 or b >= 0xE0:
        return at + 1
    size = 0
    if b == 0xCC or b == 0xD0:
        size = 2
    elif b == 0xCD or b == 0xD1:
        size = 3
    elif b == 0xCE or b == 0xD2:
        size = 5
    elif b == 0xCF or b == 0xD3:
        size = 9
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
def _walk(buf: npt.NDArray[np.uint8]) -> npt.NDArray[np.int64]:
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


def _learn(
    levels: tuple[str, ...], payload: bytes, batch: Batch, limits: DecodeLimits, now_us: int
) -> _Shape | None:
    """The shape of a payload `decode_batch` accepted, if it has the compact form."""
    if sys.byteorder != "little":  # _values_like reads little-endian float64 as native
        return None
    found = _walk(np.frombuffer(payload, np.uint8)).tolist()
    if not found:
        return None
    t0_span = (found[0], found[1])
    seq_span = (found[2], found[3]) if found[2] >= 0 else None
    spans = list(zip(found[4::2], found[5::2], strict=True))
    if [end - start for start, end in spans] != [8 * n for n in batch.counts]:
        return None
    t0 = _int(payload, t0_span)
    if t0 is None:
        return None
    buf = np.frombuffer(payload, np.uint8)
    fixed = np.full(len(buf), 0xFF, np.uint8)
    for start, end in [t0_span, *([seq_span] if seq_span else []), *spans]:
        fixed[start:end] = 0
    values = np.concatenate([np.arange(start, end, dtype=np.int32) for start, end in spans])
    offsets = batch.time - t0
    quality = np.zeros(batch.readings, np.uint8)
    quality.flags.writeable = False
    shape = _Shape(
        levels=levels,
        payload=buf,
        fixed=fixed,
        t0=t0_span,
        seq=seq_span,
        values=values,
        offsets=offsets,
        first=int(offsets.min()),
        last=int(offsets.max()),
        # Interned: the devices of a plant share their sensor names and units.
        names=tuple([sys.intern(n) for n in batch.names]),
        units=tuple([None if u is None else sys.intern(u) for u in batch.units]),
        counts=batch.counts,
        quality=quality,
    )
    # What the shape reads back from its own payload must be what was decoded.
    again = _decode_like(shape, payload, limits, now_us)
    if (
        again is None
        or again.seq != batch.seq
        or not np.array_equal(again.time, batch.time)
        or again.value.tobytes() != batch.value.tobytes()
    ):
        return None
    return shape


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernel (see `ingest.warmup`)."""
    buf = np.zeros(16, np.uint8)
    received = np.frombuffer(bytes(16), np.uint8)  # read-only, as a payload's bytes are
    values = np.arange(8, dtype=np.int32)
    _values_like(received, received, buf, values, np.zeros(1, np.int64), 0)
    _walk(received)
