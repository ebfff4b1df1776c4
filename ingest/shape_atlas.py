"""The shapes `ingest.shapes` has learnt, laid out end to end in a few arrays (an atlas), so
that a flush's shaped payloads are checked and read by one kernel call given only their bytes,
their shapes' numbers and their t0: nothing of a shape is copied per payload."""

from __future__ import annotations

from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

from ingest.jit import small_kernel
from ingest.shape_layout import SAFE, int_at

__all__ = ["Atlas", "compile_kernels"]

_BYTES, _CHANNELS, _READINGS = 0, 1, 2  # the columns of `Atlas.starts` and `Atlas.sizes`


_A = TypeVar("_A", bound=np.ndarray[Any, Any])


def _grown(array: _A, need: int) -> _A:
    """`array`, or a copy at least twice as long, holding at least `need` along axis 0."""
    if need <= array.shape[0]:
        return array
    out = np.zeros((max(need, 2 * array.shape[0]), *array.shape[1:]), array.dtype)
    out[: array.shape[0]] = array
    return cast(_A, out)


class Atlas:
    """Shapes end to end. Shape k's payload bytes (and which of them are fixed) are
    ``starts[k, 0]`` on in `like` and `fixed`, ``sizes[k, 0]`` long; its channels' value
    spans (start and end within the payload) and lengths are ``starts[k, 1]`` on in `spans`
    (two each) and `lengths`; its readings' times minus t0 are ``starts[k, 2]`` on in
    `offsets`. ``fields[k]`` holds where its t0 and seq lie in the payload (start and end;
    -1: no seq) and its least and greatest offset. Only grows; `ingest.shapes` starts a new
    one when it forgets its topics, or when most of it holds shapes no topic uses."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        """Which of the atlases one after the other this is."""
        self.count = 0
        self._used = [0, 0, 0]
        self.starts = np.zeros((64, 3), np.int64)
        self.sizes = np.zeros((64, 3), np.int64)
        self.fields = np.zeros((64, 6), np.int64)
        self.like = np.zeros(1 << 16, np.uint8)
        self.fixed = np.zeros(1 << 16, np.uint8)
        self.spans = np.zeros(1 << 11, np.int64)
        self.lengths = np.zeros(1 << 10, np.int64)
        self.offsets = np.zeros(1 << 10, np.int64)

    @property
    def nbytes(self) -> int:
        """The shapes' payload bytes it holds."""
        return self._used[0]

    def add(
        self,
        like: npt.NDArray[np.uint8],
        fixed: npt.NDArray[np.uint8],
        spans: npt.NDArray[np.int64],
        lengths: npt.NDArray[np.int64],
        offsets: npt.NDArray[np.int64],
        fields: tuple[int, int, int, int, int, int],
    ) -> int:
        """Add a shape; its number."""
        k = self.count
        b, c, r = self._used
        nb, nc, nr = len(like), len(lengths), len(offsets)
        if (
            k >= len(self.starts)
            or b + nb > len(self.like)
            or c + nc > len(self.lengths)
            or 2 * (c + nc) > len(self.spans)
            or r + nr > len(self.offsets)
        ):
            self.starts = _grown(self.starts, k + 1)
            self.sizes = _grown(self.sizes, k + 1)
            self.fields = _grown(self.fields, k + 1)
            self.like = _grown(self.like, b + nb)
            self.fixed = _grown(self.fixed, b + nb)
            self.spans = _grown(self.spans, 2 * (c + nc))
            self.lengths = _grown(self.lengths, c + nc)
            self.offsets = _grown(self.offsets, r + nr)
        self.starts[k] = b, c, r
        self.sizes[k] = nb, nc, nr
        self.fields[k] = fields
        self.like[b : b + nb] = like
        self.fixed[b : b + nb] = fixed
        self.spans[2 * c : 2 * (c + nc)] = spans
        self.lengths[c : c + nc] = lengths
        self.offsets[r : r + nr] = offsets
        self._used = [b + nb, c + nc, r + nr]
        self.count = k + 1
        return k

    def read(
        self,
        buf: npt.NDArray[np.uint8],
        index: npt.NDArray[np.int64],
        lo: npt.NDArray[np.int64],
        hi: npt.NDArray[np.int64],
    ) -> tuple[
        npt.NDArray[np.bool_],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.int64],
        npt.NDArray[np.float64],
        npt.NDArray[np.int64],
    ]:
        """Payloads one after the other in `buf`, payload m of shape index[m], its readings'
        times to be within lo[m] and hi[m]: whether each matched its shape (its t0 and seq
        MessagePack integers of the shape's sizes, seq not negative, its times within the
        limits, its other bytes the shape's), its seq (-1 where the shape has none), where each
        one's readings start (and the end), the readings' times and values (unset where a
        payload did not match), and the lengths of their channels."""
        ok, seqs, bounds, time, raw, lengths = _read_shaped(
            buf,
            index,
            lo,
            hi,
            self.starts,
            self.sizes,
            self.fields,
            self.like,
            self.fixed,
            self.spans,
            self.lengths,
            self.offsets,
        )
        return ok, seqs, bounds, time, raw.view(np.float64), lengths


@small_kernel
def _read_shaped(
    buf: npt.NDArray[np.uint8],
    index: npt.NDArray[np.int64],
    lo: npt.NDArray[np.int64],
    hi: npt.NDArray[np.int64],
    starts: npt.NDArray[np.int64],
    sizes: npt.NDArray[np.int64],
    fields: npt.NDArray[np.int64],
    like: npt.NDArray[np.uint8],
    fixed: npt.NDArray[np.uint8],
    spans: npt.NDArray[np.int64],
    lengths: npt.NDArray[np.int64],
    offsets: npt.NDArray[np.int64],
) -> tuple[
    npt.NDArray[np.bool_],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.uint8],
    npt.NDArray[np.int64],
]:
    """`Atlas.read`; the values as their little-endian float64 bytes."""
    n = index.shape[0]
    bounds = np.zeros(n + 1, np.int64)
    channels = 0
    for m in range(n):
        bounds[m + 1] = bounds[m] + sizes[index[m], 2]
        channels += sizes[index[m], 1]
    ok = np.zeros(n, np.bool_)
    seqs = np.full(n, -1, np.int64)
    time = np.empty(bounds[n], np.int64)
    raw = np.empty(8 * bounds[n], np.uint8)
    out_lengths = np.empty(channels, np.int64)
    at = 0  # payload m's first byte in buf
    c_out = 0
    for m in range(n):
        k = index[m]
        lb, nb = starts[k, 0], sizes[k, 0]
        cb, nc = starts[k, 1], sizes[k, 1]
        rb, nr = starts[k, 2], sizes[k, 2]
        out_lengths[c_out : c_out + nc] = lengths[cb : cb + nc]
        c_out += nc
        valid, t0 = int_at(buf, at + fields[k, 0], at + fields[k, 1])
        if fields[k, 2] >= 0:
            got, seq = int_at(buf, at + fields[k, 2], at + fields[k, 3])
            valid = valid and got and seq >= 0
            seqs[m] = seq
        first, last = fields[k, 4], fields[k, 5]
        if not valid or t0 > hi[m] or max(abs(t0), abs(first), abs(last)) >= SAFE:
            at += nb  # a payload outside these bounds is decoded in full, which decides
            continue
        if t0 + first < lo[m] or t0 + last > hi[m]:
            at += nb
            continue
        # No early exit, and over views of their own: only then is the loop vectorized (five
        # times faster than indexing the whole arrays at an offset).
        have, want, mask = buf[at : at + nb], like[lb : lb + nb], fixed[lb : lb + nb]
        diff = np.uint8(0)
        for i in range(nb):
            diff |= (have[i] ^ want[i]) & mask[i]
        if not diff:
            ok[m] = True
            r = bounds[m]
            for j in range(nr):
                time[r + j] = offsets[rb + j] + t0
            w = 8 * r
            for c in range(cb, cb + nc):
                a, b = at + spans[2 * c], at + spans[2 * c + 1]
                raw[w : w + b - a] = buf[a:b]
                w += b - a
        at += nb
    return ok, seqs, bounds, time, raw, out_lengths


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, this module's kernel (see `ingest.warmup`)."""
    atlas = Atlas(0)
    payload = np.frombuffer(bytes(16), np.uint8)  # read-only, as a payload's bytes are
    k = atlas.add(
        payload,
        payload,
        np.array([8, 16], np.int64),
        np.ones(1, np.int64),
        np.zeros(1, np.int64),
        (0, 1, 1, 2, 0, 0),
    )
    atlas.read(payload, np.array([k], np.int64), np.zeros(1, np.int64), np.ones(1, np.int64))
