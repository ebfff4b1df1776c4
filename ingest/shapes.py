"""Message shapes: a device that sends the same channels every second sends MessagePack
payloads that differ only in `t0`, `seq` and the bytes of their values. The first payload
of a topic is decoded in full (`ingest.decode`) and kept; when a second one comes, the topic's
shape is learnt from the first, and the second and the next ones of the same shape are checked
byte for byte against it and decoded from their bytes, without a Python object per channel.

Anything else (another length, another byte outside those fields, JSON, arrays of numbers,
explicit times or quality) is decoded in full, as always, and becomes the topic's shape if it
has the usual compact form. Called from one task only.

On the hot path a payload is only looked at when it arrives (`Shapes.accept`: its length, t0,
seq and the times they give); the bytes of a whole flush's shaped payloads are then checked
and their values read by one kernel call (`Shapes.settle`), and a payload whose bytes turn out
to differ is decoded in full then (`Shapes.fallback`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.decode import Batch, DecodeLimits, decode_batch, parse_topic
from ingest.shape_atlas import Atlas
from ingest.shape_layout import Span, layout, learnt
from ingest.wire import I64_MAX

__all__ = ["Settled", "Shaped", "Shapes"]

_S = TypeVar("_S", str, str | None)

_MAX_TOPICS = 200_000  # shapes remembered; past that the cache starts again
# An atlas is started again once more than half its bytes, and more than this, are shapes that
# topics replaced with another (their payloads changed form): its size stays within about
# twice the shapes in use.
_MIN_DEAD = 1 << 20


@dataclass(slots=True, eq=False)
class _Shape:
    levels: tuple[str, ...]
    payload: npt.NDArray[np.uint8]  # the payload it was learnt from (read-only, its bytes)
    t0: Span
    seq: Span | None
    spans: npt.NDArray[np.int64]  # each channel's value bytes' start and end, flat
    offsets: npt.NDArray[np.int64]  # each reading's time minus t0
    first: int  # least and greatest offset
    last: int
    names: tuple[str, ...]  # shared by every batch of the shape, as are units, counts
    units: tuple[str | None, ...]
    counts: tuple[int, ...]
    quality: npt.NDArray[np.uint8]  # zeros, read-only, shared too
    lengths: npt.NDArray[np.int64]  # counts as an array
    atlas: int  # the generation of the atlas where `settle` finds it, as shape number `index`
    index: int
    ids: npt.NDArray[np.int32] | None = None
    """The sensor ids of its channels, as the registry gave them at units version `version`
    (kept here by `ingest.writer`: a shape's sensors cost no look-up)."""
    version: int = -1


class Shaped(msgspec.Struct, eq=False, gc=False):
    """A payload of its topic's shape's length, with the limits of its readings' times as they
    were when it arrived (`lo` to `hi`, µs). `Shapes.settle` reads its t0 and seq, checks them
    and its other bytes, and reads its values.

    A Struct outside the garbage collector: one is made per message, in a third of a
    dataclass's time, and triggers no collection (it is never part of a cycle)."""

    shape: _Shape
    payload: bytes
    lo: int
    hi: int

    @property
    def readings(self) -> int:
        return len(self.shape.offsets)


@dataclass(frozen=True, slots=True)
class Settled:
    """Shaped payloads read together: whether each matched its shape, their readings' columns
    one after the other (payload i's at bounds[i]:bounds[i + 1]; unset where it did not
    match), and their channels' lengths."""

    shaped: Sequence[Shaped]
    ok: list[bool]
    seqs: list[int]
    bounds: list[int]
    time: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    lengths: npt.NDArray[np.int64]

    @property
    def complete(self) -> bool:
        """Whether every payload matched its shape: then the columns hold every reading."""
        return False not in self.ok

    def batch(self, i: int) -> Batch | None:
        """Payload i's batch (its arrays views of the columns), None if it did not match."""
        if not self.ok[i]:
            return None
        s, a, b = self.shaped[i], self.bounds[i], self.bounds[i + 1]
        x = s.shape
        seq = None if x.seq is None else self.seqs[i]
        return Batch(
            seq, x.names, x.units, x.counts, b - a, self.time[a:b], self.value[a:b], x.quality
        )


@dataclass(frozen=True, slots=True)
class _First:
    """A topic's first payload, decoded: its shape is learnt from it if a second one comes
    (the first sight of a plant, every sensor registered at once, does not pay for it)."""

    levels: tuple[str, ...]
    payload: bytes
    batch: Batch


class Shapes:
    """Decodes the payloads of each topic, remembering the topic's levels and shape."""

    def __init__(self, *, prefix: str) -> None:
        self._prefix = prefix
        self._topics: dict[str, _Shape | _First | tuple[str, ...]] = {}
        self._atlas = Atlas(0)
        self._dead = 0  # payload bytes of the current atlas's shapes no topic uses any more
        self.matched = 0
        """Payloads decoded by their topic's shape."""

    @property
    def held_bytes(self) -> int:
        """Payload bytes of the shapes held for `settle` (at most about twice those in use)."""
        return self._atlas.nbytes

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
        `parse_topic` and `decode_batch`. (`accept` and `settle` in two steps.)"""
        levels, got = self.accept(
            topic, payload, content_type=content_type, limits=limits, now_us=now_us
        )
        if isinstance(got, Batch):
            return levels, got
        batch = self.settle([got]).batch(0)
        if batch is not None:
            return levels, batch
        return self.fallback(topic, got, content_type=content_type, limits=limits, now_us=now_us)

    def accept(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str | None,
        limits: DecodeLimits,
        now_us: int,
    ) -> tuple[tuple[str, ...], Batch | Shaped]:
        """The topic's levels, and the payload's batch, or a `Shaped` to be read with others
        by `settle`; raises PayloadError like `parse_topic` and `decode_batch`."""
        known = self._topics.get(topic)
        if isinstance(known, _First):
            first = known
            known = _learn(first.levels, first.payload, first.batch, limits, now_us, self._atlas)
            self._topics[topic] = known = known or first.levels
        if (
            isinstance(known, _Shape)
            and (content_type is None or content_type == "application/msgpack")
            and len(payload) == len(known.payload)
        ):
            hi = min(now_us + limits.max_future_us, I64_MAX)
            return known.levels, Shaped(known, payload, limits.min_time_us, hi)
        return self._decode(topic, payload, known, content_type, limits, now_us)

    def settle(self, shaped: Sequence[Shaped]) -> Settled:
        """Check the bytes of every `shaped` payload against its shape and read its values,
        in one kernel call."""
        settled = _read(shaped, self._atlas)
        self.matched += sum(settled.ok)
        return settled

    def fallback(
        self,
        topic: str,
        shaped: Shaped,
        *,
        content_type: str | None,
        limits: DecodeLimits,
        now_us: int,
    ) -> tuple[tuple[str, ...], Batch]:
        """A payload `settle` found to differ from its shape, decoded in full (its topic then
        learns its shape from it); raises PayloadError like `decode_batch`."""
        return self._decode(topic, shaped.payload, shaped.shape, content_type, limits, now_us)

    def _decode(
        self,
        topic: str,
        payload: bytes,
        known: _Shape | tuple[str, ...] | None,
        content_type: str | None,
        limits: DecodeLimits,
        now_us: int,
    ) -> tuple[tuple[str, ...], Batch]:
        if isinstance(known, _Shape):
            levels = known.levels
        elif known is None:
            levels = parse_topic(topic, prefix=self._prefix)
        else:
            levels = known
        batch = decode_batch(payload, content_type=content_type, limits=limits, now_us=now_us)
        if known is None:
            if len(self._topics) >= _MAX_TOPICS:
                self._topics.clear()
                self._new_atlas()
            self._topics[topic] = _First(levels, payload, batch)
        else:
            if isinstance(known, _Shape) and known.atlas == self._atlas.generation:
                self._dead += len(known.payload)
            learnt = _learn(levels, payload, batch, limits, now_us, self._atlas)
            self._topics[topic] = learnt or levels
            if self._dead > _MIN_DEAD and 2 * self._dead > self._atlas.nbytes:
                self._new_atlas()
        return levels, batch

    def _new_atlas(self) -> None:
        """Start a new atlas: the shapes in use are added to it as their payloads are read
        again (those of payloads in flight too), those replaced are gone with the old one."""
        self._atlas = Atlas(self._atlas.generation + 1)
        self._dead = 0


def _read(shaped: Sequence[Shaped], atlas: Atlas) -> Settled:
    """`Shapes.settle`."""
    generation = atlas.generation
    index = [s.shape.index if s.shape.atlas == generation else -1 for s in shaped]
    if -1 in index:  # learnt into an earlier atlas: into this one too
        for i, s in enumerate(shaped):
            if s.shape.atlas != generation:
                x = s.shape
                t0, seq = x.t0, x.seq or (-1, -1)
                fixed, _ = layout(len(x.payload), np.array([*t0, *seq, *x.spans], np.int64))
                x.atlas = generation
                x.index = atlas.add(x.payload, fixed, x.spans, x.lengths, x.offsets, _fields(x))
            index[i] = s.shape.index
    buf = np.frombuffer(b"".join([s.payload for s in shaped]), np.uint8)
    lo = np.array([s.lo for s in shaped], np.int64)
    hi = np.array([s.hi for s in shaped], np.int64)
    ok, seqs, bounds, time, value, lengths = atlas.read(buf, np.array(index, np.int64), lo, hi)
    return Settled(shaped, ok.tolist(), seqs.tolist(), bounds.tolist(), time, value, lengths)


def _fields(shape: _Shape) -> tuple[int, int, int, int, int, int]:
    """Where `Atlas.read` finds the shape's t0 and seq (-1: none), and its least and greatest
    offset."""
    seq = shape.seq or (-1, -1)
    return (*shape.t0, *seq, shape.first, shape.last)


def _learn(
    levels: tuple[str, ...],
    payload: bytes,
    batch: Batch,
    limits: DecodeLimits,
    now_us: int,
    atlas: Atlas,
) -> _Shape | None:
    """The shape of a payload `decode_batch` accepted, if it has the compact form (what the
    shape reads back from its own payload must be what was decoded)."""
    if sys.byteorder != "little":  # _read_shaped reads little-endian float64 as native
        return None
    buf = np.frombuffer(payload, np.uint8)
    lengths = np.array(batch.counts, np.int64)
    hi = min(now_us + limits.max_future_us, I64_MAX)
    seq = -1 if batch.seq is None else batch.seq
    value = np.ascontiguousarray(batch.value).view(np.uint8)
    found, fixed, offsets, first, last = learnt(
        buf, lengths, batch.time, value, seq, limits.min_time_us, hi
    )
    if not len(found):
        return None
    shape = _Shape(
        levels=levels,
        payload=buf,
        t0=(int(found[0]), int(found[1])),
        seq=(int(found[2]), int(found[3])) if found[2] >= 0 else None,
        spans=found[4:],
        offsets=offsets,
        first=first,
        last=last,
        names=_interned(batch.names),
        units=_interned(batch.units),
        counts=batch.counts,
        quality=_zeros(batch.readings),
        lengths=lengths,
        atlas=atlas.generation,
        index=-1,
    )
    shape.index = atlas.add(buf, fixed, shape.spans, lengths, offsets, _fields(shape))
    return shape


_INTERNED: dict[tuple[Any, ...], tuple[Any, ...]] = {}
_ZEROS: dict[int, npt.NDArray[np.uint8]] = {}


def _interned(names: tuple[_S, ...]) -> tuple[_S, ...]:
    """`names` with its strings interned, the same tuple for equal ones: the devices of a
    plant share their sensor names and units."""
    got = _INTERNED.get(names)
    if got is None:
        if len(_INTERNED) >= _MAX_TOPICS:
            _INTERNED.clear()
        got = tuple([n if n is None else sys.intern(n) for n in names])
        _INTERNED[got] = got
    return got


def _zeros(n: int) -> npt.NDArray[np.uint8]:
    """n zeros, read-only: the quality of a shape's readings, shared by equal ones."""
    got = _ZEROS.get(n)
    if got is None:
        if len(_ZEROS) >= 1024:
            _ZEROS.clear()
        got = _ZEROS[n] = np.zeros(n, np.uint8)
        got.flags.writeable = False
    return got
