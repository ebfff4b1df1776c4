"""Anomaly filters per sensor (range, rate, spike, drift, flatline): transactional numba kernels."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.kernels import kernel
from ingest.rules import AnomalyRule

__all__ = ["KINDS", "AnomalyDetector", "Event", "Pending", "StateNeed", "warm_up"]

KINDS: Final = ("range", "rate", "spike", "drift", "flatline")
"""Event kinds; a kind's index in this tuple is its bit in the kernels' filter mask."""

MAD_SCALE: Final = 1.4826
"""Scales a median absolute deviation to a standard deviation for normal data (Hampel)."""

_NO_TIME: Final = -(2**63)
_KIND_INDEX: Final = {kind: i for i, kind in enumerate(KINDS)}
_RANGE, _RATE, _SPIKE, _DRIFT, _FLAT = 0, 1, 2, 3, 4

# Rule parameters per slot (written by assign, read-only in the kernels).
_P_MASK, _P_SPIKE_W, _P_DRIFT_W, _P_DRIFT_B, _P_FLAT_N, _P_FLAT_US, _P_HIST, _P_OFF = range(8)
_NPI: Final = 8
_Q_MIN, _Q_MAX, _Q_RATE, _Q_SPIKE_K, _Q_SPIKE_FLOOR, _Q_DRIFT_K, _Q_DRIFT_FLOOR = range(7)
_NPF: Final = 7
# Mutable state per slot: last time, flatline run, history length; last value. A slot's pool
# area holds its last `hist` finite values in time order, then the spike window sorted.
_S_LAST, _S_RUN_START, _S_RUN_COUNT, _S_HLEN = range(4)
_NSI: Final = 4
_S_PREV: Final = 0
_NSF: Final = 1
# Open-event state per slot and kind.
_E_OPEN, _E_START, _E_LAST = range(3)
_NEI: Final = 3
_E_VALUE, _E_SCORE = range(2)
_NEF: Final = 2

_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One anomaly event, upserted by the key (sensor, kind, start).

    `start` is the time of the first offending reading (flatline: of the first reading of the
    unchanged run), `end` that of the last offending reading, None while the condition goes on.
    `score` is the maximum over the event and `value` the value at which it was reached (drift:
    the rolling mean); `detail` describes that worst reading.
    """

    sensor: int
    kind: str
    start: int
    end: int | None
    value: float
    score: float
    detail: str


class StateNeed(msgspec.Struct, frozen=True, kw_only=True):
    """History a sensor's state is rebuilt from: its last `readings` finite readings, and also
    every finite reading less than `span_us` before its latest one (`span_us` is 0 if unused).
    """

    readings: int
    span_us: int


class Pending:
    """The outcome of one `AnomalyDetector.process` call, not yet applied to the detector.

    `events` are the upserts for the database (one per event touched by the flush), `late`
    counts the finite readings ignored as late (time not after the sensor's last one).
    """

    __slots__ = ("_owner", "_seg", "_state", "_versions", "events", "late")

    def __init__(
        self,
        *,
        owner: AnomalyDetector,
        seg: _I64,
        versions: _I64,
        state: tuple[Any, ...],
        events: tuple[Event, ...],
        late: int,
    ) -> None:
        self._owner = owner
        self._seg = seg
        self._versions = versions
        self._state = state
        self.events = events
        self.late = late


class _Compiled(msgspec.Struct, frozen=True):
    ints: tuple[int, ...]
    floats: tuple[float, ...]
    size: int
    need: StateNeed


def _compile(rule: AnomalyRule) -> _Compiled:
    inf = math.inf
    mask = 0
    if rule.min is not None or rule.max is not None:
        mask |= 1 << _RANGE
    if rule.max_rate is not None:
        mask |= 1 << _RATE
    spike_w = rule.spike_window or 0
    if spike_w:
        mask |= 1 << _SPIKE
    drift_w = rule.drift_window or 0
    drift_b = rule.drift_baseline or 0
    if drift_w:
        mask |= 1 << _DRIFT
    flat_n = rule.flatline_count or 0
    flat_us = max(1, round(rule.flatline_seconds * 1e6)) if rule.flatline_seconds else 0
    if flat_n or flat_us:
        mask |= 1 << _FLAT
    hist = max(spike_w, drift_w - 1 + drift_b)
    ints = (mask, spike_w, drift_w, drift_b, flat_n, flat_us, hist, 0)
    floats = (
        -inf if rule.min is None else float(rule.min),
        inf if rule.max is None else float(rule.max),
        inf if rule.max_rate is None else float(rule.max_rate),
        3.0 if rule.spike_threshold is None else float(rule.spike_threshold),
        float(rule.spike_min_sigma or 0.0),
        3.0 if rule.drift_sigma is None else float(rule.drift_sigma),
        float(rule.drift_min_sigma or 0.0),
    )
    readings = max(1, hist, flat_n - 1)
    need = StateNeed(readings=readings, span_us=flat_us if flat_us and not flat_n else 0)
    return _Compiled(ints=ints, floats=floats, size=hist + spike_w, need=need)


def _detail(kind: int, value: float, score: float, rule: AnomalyRule) -> str:
    if kind == _RANGE:
        if rule.max is not None and value > rule.max:
            return f"above max {float(rule.max)!r}"
        return f"below min {float(rule.min or 0.0)!r}"
    if kind == _RATE:
        return f"rate {score:.3g} x max_rate {float(rule.max_rate or 0.0)!r}/s"
    if kind == _SPIKE:
        return f"{score:.3g} scaled MADs from the median of the last {rule.spike_window}"
    if kind == _DRIFT:
        return (
            f"mean of the last {rule.drift_window} is {score:.3g} sd from "
            f"the {rule.drift_baseline} before"
        )
    return f"unchanged for {score:g} s"


# ---------------------------------------------------------------------------------------------
# Kernels


@kernel
def _check_sorted(sensor: npt.NDArray[np.int32], time: _I64) -> int:
    """-1 if sorted by (sensor, time) with unique keys, else the first offending row."""
    for i in range(1, sensor.shape[0]):
        if sensor[i] < sensor[i - 1] or (sensor[i] == sensor[i - 1] and time[i] <= time[i - 1]):
            return i
    return -1


@kernel
def _median(buf: _F64, lo: int, w: int) -> float:
    """Median of the sorted buf[lo : lo + w]."""
    h = w // 2
    if w % 2 == 1:
        return float(buf[lo + h])
    return float((buf[lo + h - 1] + buf[lo + h]) / 2.0)


@kernel
def _bisect(buf: _F64, lo: int, hi: int, x: float, right: bool) -> int:
    """First index in the sorted buf[lo:hi] whose value is > x (`right`) or >= x."""
    while lo < hi:
        mid = (lo + hi) // 2
        if buf[mid] < x or (right and buf[mid] == x):
            lo = mid + 1
        else:
            hi = mid
    return lo


@kernel
def _kth_pair(buf: _F64, split: int, nl: int, nr: int, med: float, k: int) -> Any:
    """The k-th and (k-1)-th smallest |x - med| (from 0; -1.0 for none), where buf holds nl
    sorted values below `med` up to index `split` and nr sorted values from `split` on: the
    k-th of two sorted sequences, found by bisecting how many come from below.
    """
    lo = max(0, k + 1 - nr)
    hi = min(k + 1, nl)
    while True:
        i = (lo + hi) // 2  # deviations taken from below med, j from above
        j = k + 1 - i
        if i > 0 and j < nr and abs(buf[split - i] - med) > abs(buf[split + j] - med):
            hi = i - 1
        elif j > 0 and i < nl and abs(buf[split + j - 1] - med) > abs(buf[split - 1 - i] - med):
            lo = i + 1
        else:
            break
    below = abs(buf[split - i] - med) if i > 0 else -1.0
    above = abs(buf[split + j - 1] - med) if j > 0 else -1.0
    if below >= above:
        second = abs(buf[split - i + 1] - med) if i > 1 else -1.0
        return below, max(second, above)
    second = abs(buf[split + j - 2] - med) if j > 1 else -1.0
    return above, max(below, second)


@kernel
def _mad(buf: _F64, lo: int, w: int, med: float) -> float:
    """Median of |buf[q] - med| over the sorted buf[lo : lo + w] (w >= 2), med its median."""
    split = lo + w // 2  # buf[split] >= med; values before it are <= med
    if buf[split - 1] >= med:
        split = _bisect(buf, lo, split - 1, med, False)
    nl = split - lo
    upper, lower = _kth_pair(buf, split, nl, w - nl, med, w // 2)
    if w % 2 == 1:
        return float(upper)
    return float((lower + upper) / 2.0)


@kernel
def _sorted_replace(buf: _F64, lo: int, n: int, old: float, new: float, remove: bool) -> None:
    """In the sorted buf[lo : lo + n], replace one `old` by `new` if `remove`, else insert.

    The gap left by `old` (or the end) moves towards `new`'s place one element at a time:
    readings close in time are usually close in value, so that walk is short.
    """
    q = _bisect(buf, lo, lo + n, old, False) if remove else lo + n
    if remove and new > old:
        while q + 1 < lo + n and buf[q + 1] < new:
            buf[q] = buf[q + 1]
            q += 1
    else:
        while q > lo and buf[q - 1] > new:
            buf[q] = buf[q - 1]
            q -= 1
    buf[q] = new


@kernel
def _term(a: _F64, q: int, centre: float, squares: bool) -> float:
    if squares:
        d = a[q] - centre
        return float(d * d)
    return float(a[q])


@kernel
def _lane_sum(a: _F64, lo: int, n: int, centre: float) -> float:
    """Sum of a[lo : lo + n] (of (a[q] - centre)**2 if `centre` is not NaN) in eight lanes.

    Lane r adds the terms at q = lo + r, lo + r + 8, ... in order, from 0.0; the result is
    ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)). Eight independent sums keep the adds
    pipelined, and the result still depends on the window's values alone.
    """
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    sq = not math.isnan(centre)
    end = lo + n
    q = lo
    while q + 8 <= end:
        s0 += _term(a, q, centre, sq)
        s1 += _term(a, q + 1, centre, sq)
        s2 += _term(a, q + 2, centre, sq)
        s3 += _term(a, q + 3, centre, sq)
        s4 += _term(a, q + 4, centre, sq)
        s5 += _term(a, q + 5, centre, sq)
        s6 += _term(a, q + 6, centre, sq)
        s7 += _term(a, q + 7, centre, sq)
        q += 8
    r = end - q
    if r > 0:
        s0 += _term(a, q, centre, sq)
    if r > 1:
        s1 += _term(a, q + 1, centre, sq)
    if r > 2:
        s2 += _term(a, q + 2, centre, sq)
    if r > 3:
        s3 += _term(a, q + 3, centre, sq)
    if r > 4:
        s4 += _term(a, q + 4, centre, sq)
    if r > 5:
        s5 += _term(a, q + 5, centre, sq)
    if r > 6:
        s6 += _term(a, q + 6, centre, sq)
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


_RESYNC: Final = 32
"""Drift's running window sums are recomputed exactly after this many slides."""


@kernel
def _abs_sum(a: _F64, lo: int, n: int) -> float:
    total = 0.0
    for q in range(lo, lo + n):
        total += abs(a[q])
    return total


@kernel
def _surely_quiet(
    sb: float, sr: float, ab: float, ar: float, wb: int, wd: int, quiet: float
) -> bool:
    """True only if the exact drift distance |mean_r - mean_b| is at most `quiet`.

    sb and sr are running sums of the baseline and recent windows, at most _RESYNC slides
    (two additions each) from an exact lane sum; ab and ar bound the sum of |x| over every
    value that went into them. Each differs from the lane sum of its window by at most
    (2 * n + 2 * _RESYNC) * u * a (u = 2**-53: the recursive-summation bound applied to the
    slides, the lane sum and the window's true sum); the means and their difference add a
    few roundings more. The margin below covers all of it twice over; a sum that overflowed
    makes it inf or NaN, and the answer False.
    """
    u = 2.0**-53
    gamma = (2.0 * (wb + wd) + 2.0 * _RESYNC + 16.0) * u * 1.25
    mean_b = sb / wb
    mean_r = sr / wd
    err = gamma * (ab / wb + ar / wd) + 8.0 * u * (abs(mean_b) + abs(mean_r))
    return bool(abs(mean_r - mean_b) + 2.0 * err < quiet)


@kernel
def _grow(ev_i: _I64, ev_f: _F64) -> Any:
    cap = ev_i.shape[0] * 2
    new_i = np.empty((cap, 4), np.int64)
    new_f = np.empty((cap, 2), np.float64)
    new_i[: ev_i.shape[0]] = ev_i
    new_f[: ev_f.shape[0]] = ev_f
    return new_i, new_f


@kernel
def _track(
    kind: int,
    sid: int,
    i: int,
    n: int,
    verdicts: Any,
    when: _I64,
    oi: _I64,
    of: _F64,
    ev_i: _I64,
    ev_f: _F64,
    m: int,
    touched: bool,
) -> Any:
    """Turn one filter's verdicts on readings i..n-1 (at times `when`) into events.

    `verdicts` holds the (offending, score, value, start) columns; `oi`/`of` are the open-event
    state of this sensor and kind, updated in place. Appends an upsert to ev_i/ev_f for every
    event that ends, and at the end for the event left open if an offending reading touched
    it. Stops early, returning where, when ev_i is full (arrays are never reassigned in the
    loop: that would cost a reference count per reading). Returns (i, m, touched).
    """
    off, score, value, start = verdicts
    is_open = oi[_E_OPEN] == 1
    ev_start = oi[_E_START]
    ev_last = oi[_E_LAST]
    ev_value = of[_E_VALUE]
    ev_score = of[_E_SCORE]
    room = ev_i.shape[0] - 1  # the last row is kept for the event left open
    while i < n:
        if off[i]:
            if not is_open:
                is_open = True
                ev_start = start[i]
                ev_value = value[i]
                ev_score = score[i]
            elif score[i] > ev_score:
                ev_value = value[i]
                ev_score = score[i]
            ev_last = when[i]
            touched = True
        elif is_open:
            if m >= room:
                break
            ev_i[m, 0] = sid
            ev_i[m, 1] = kind
            ev_i[m, 2] = ev_start
            ev_i[m, 3] = ev_last
            ev_f[m, 0] = ev_value
            ev_f[m, 1] = ev_score
            m += 1
            is_open = False
        i += 1
    if i == n and touched and is_open:
        ev_i[m, 0] = sid
        ev_i[m, 1] = kind
        ev_i[m, 2] = ev_start
        ev_i[m, 3] = _NO_TIME
        ev_f[m, 0] = ev_value
        ev_f[m, 1] = ev_score
        m += 1
    oi[_E_OPEN] = 1 if is_open else 0
    oi[_E_START] = ev_start
    oi[_E_LAST] = ev_last
    of[_E_VALUE] = ev_value
    of[_E_SCORE] = ev_score
    return i, m, touched


@kernel
def _events(
    kind: int,
    sid: int,
    n: int,
    verdicts: Any,
    when: _I64,
    oi: _I64,
    of: _F64,
    ev_i: _I64,
    ev_f: _F64,
    m: int,
) -> Any:
    """`_track` over all n readings, growing the event arrays as needed: (ev_i, ev_f, m)."""
    i = 0
    touched = False
    while True:
        if m >= ev_i.shape[0] - 1:
            ev_i, ev_f = _grow(ev_i, ev_f)
        i, m, touched = _track(kind, sid, i, n, verdicts, when, oi, of, ev_i, ev_f, m, touched)
        if i == n:
            return ev_i, ev_f, m


@kernel
def _process_kernel(
    sensor: npt.NDArray[np.int32],
    time: _I64,
    value: _F64,
    slot_of: npt.NDArray[np.int32],
    pi: _I64,
    pf: _F64,
    si: _I64,
    sf: _F64,
    ei: _I64,
    ef: _F64,
    pool: _F64,
) -> Any:
    """Run the filters over sorted columns; the new state goes to scratch copies, not `si`...

    Per sensor: the finite, timely readings are appended to the sensor's history in one
    contiguous array, so every window is a slice of it; then each filter in turn judges them
    all and `_track` turns its verdicts into events.
    """
    n = sensor.shape[0]
    nseg = 0
    for i in range(n):
        if i == 0 or sensor[i] != sensor[i - 1]:
            s = sensor[i]
            if 0 <= s < slot_of.shape[0] and slot_of[s] >= 0:
                nseg += 1
    seg = np.empty(nseg, np.int64)
    seg_lo = np.empty(nseg, np.int64)
    seg_hi = np.empty(nseg, np.int64)
    xoff = np.empty(nseg, np.int64)
    j = -1
    size = 0
    longest = 0
    current = False
    for i in range(n):
        if i == 0 or sensor[i] != sensor[i - 1]:
            s = sensor[i]
            slot = slot_of[s] if 0 <= s < slot_of.shape[0] else -1
            if slot >= 0:
                j += 1
                seg[j] = slot
                seg_lo[j] = i
                xoff[j] = size
                size += pi[slot, _P_HIST] + pi[slot, _P_SPIKE_W]
            current = slot >= 0
        if current:
            seg_hi[j] = i + 1
    for j in range(nseg):
        longest = max(longest, seg_hi[j] - seg_lo[j] + pi[seg[j], _P_HIST])
    xsi = np.empty((nseg, _NSI), np.int64)
    xsf = np.empty((nseg, _NSF), np.float64)
    xei = np.empty((nseg, 5, _NEI), np.int64)
    xef = np.empty((nseg, 5, _NEF), np.float64)
    xpool = np.empty(size, np.float64)
    ev_i = np.empty((16 + nseg, 4), np.int64)
    ev_f = np.empty((16 + nseg, 2), np.float64)
    m = 0
    late = 0
    ext = np.empty(longest, np.float64)  # history, then this flush's accepted values
    when = np.empty(longest, np.int64)  # times of the accepted values
    off = np.empty(longest, np.bool_)
    score = np.empty(longest, np.float64)
    val = np.empty(longest, np.float64)
    start = np.empty(longest, np.int64)
    verdicts = (off, score, val, start)
    for j in range(nseg):
        s = seg[j]
        xsi[j] = si[s]
        xsf[j] = sf[s]
        xei[j] = ei[s]
        xef[j] = ef[s]
        mask = pi[s, _P_MASK]
        hcap = pi[s, _P_HIST]
        spike_w = pi[s, _P_SPIKE_W]
        o = xoff[j]
        po = pi[s, _P_OFF]
        xpool[o : o + hcap + spike_w] = pool[po : po + hcap + spike_w]
        last = xsi[j, _S_LAST]
        has_prev = last != _NO_TIME
        prev = xsf[j, _S_PREV]
        h = xsi[j, _S_HLEN]
        ext[:h] = xpool[o : o + h]
        na = 0
        for i in range(seg_lo[j], seg_hi[j]):
            x = value[i]
            if not math.isfinite(x):
                continue
            t = time[i]
            if has_prev and t <= last:  # times rise within a sensor: only old ones are late
                late += 1
                continue
            ext[h + na] = x
            when[na] = t
            na += 1
        if na == 0:
            continue
        sid = sensor[seg_lo[j]]
        if mask & (1 << _RANGE):
            lo_limit = pf[s, _Q_MIN]
            hi_limit = pf[s, _Q_MAX]
            for i in range(na):
                x = ext[h + i]
                off[i] = x > hi_limit or x < lo_limit
                score[i] = x - hi_limit if x > hi_limit else lo_limit - x
                val[i] = x
                start[i] = when[i]
            ev_i, ev_f, m = _events(
                _RANGE, sid, na, verdicts, when, xei[j, _RANGE], xef[j, _RANGE], ev_i, ev_f, m
            )
        if mask & (1 << _RATE):
            max_rate = pf[s, _Q_RATE]
            for i in range(na):
                x = ext[h + i]
                off[i] = False
                if i > 0 or has_prev:
                    px = ext[h + i - 1] if i > 0 else prev
                    pt = when[i - 1] if i > 0 else last
                    rate = abs(x - px) / (float(when[i] - pt) / 1e6)
                    off[i] = rate > max_rate
                    score[i] = rate / max_rate
                val[i] = x
                start[i] = when[i]
            ev_i, ev_f, m = _events(
                _RATE, sid, na, verdicts, when, xei[j, _RATE], xef[j, _RATE], ev_i, ev_f, m
            )
        if mask & (1 << _SPIKE):
            spike_k = pf[s, _Q_SPIKE_K]
            spike_floor = pf[s, _Q_SPIKE_FLOOR]
            sw = o + hcap  # the sorted window of the last spike_w values
            for i in range(na):
                p = h + i
                x = ext[p]
                off[i] = False
                full = p >= spike_w
                if full:
                    med = _median(xpool, sw, spike_w)
                    dev = abs(x - med)
                    # sigma >= the floor: within k floors of the median needs no MAD.
                    if dev > spike_k * spike_floor:
                        sigma = MAD_SCALE * _mad(xpool, sw, spike_w, med)
                        if sigma < spike_floor:
                            sigma = spike_floor
                        off[i] = dev > spike_k * sigma
                        score[i] = dev / sigma if sigma > 0.0 else math.inf
                val[i] = x
                start[i] = when[i]
                old = ext[p - spike_w] if full else 0.0
                _sorted_replace(xpool, sw, min(p, spike_w), old, x, full)
            ev_i, ev_f, m = _events(
                _SPIKE, sid, na, verdicts, when, xei[j, _SPIKE], xef[j, _SPIKE], ev_i, ev_f, m
            )
        if mask & (1 << _DRIFT):
            wd = pi[s, _P_DRIFT_W]
            wb = pi[s, _P_DRIFT_B]
            drift_k = pf[s, _Q_DRIFT_K]
            drift_floor = pf[s, _Q_DRIFT_FLOOR]
            quiet = drift_k * drift_floor  # sd >= the floor: dist <= quiet never offends
            since = _RESYNC
            sb = sr = ab = ar = 0.0
            for i in range(na):
                p = h + i
                off[i] = False
                if p >= wd - 1 + wb:
                    base = p - wd + 1 - wb
                    if quiet > 0.0:
                        # Running sums of both windows, recomputed every _RESYNC readings,
                        # settle most readings without the exact sums (see _surely_quiet).
                        if since >= _RESYNC:
                            sb = _lane_sum(ext, base, wb, math.nan)
                            sr = _lane_sum(ext, base + wb, wd, math.nan)
                            ab = _abs_sum(ext, base, wb)
                            ar = _abs_sum(ext, base + wb, wd)
                            since = 0
                        else:
                            moved = ext[base + wb - 1]  # from the recent window to the baseline
                            gone = ext[base - 1]
                            sb = sb + moved - gone
                            sr = sr + ext[p] - moved
                            ab += abs(moved) + abs(gone)
                            ar += abs(ext[p]) + abs(moved)
                            since += 1
                        if _surely_quiet(sb, sr, ab, ar, wb, wd, quiet):
                            start[i] = when[i]
                            continue
                    mean_b = _lane_sum(ext, base, wb, math.nan) / wb
                    mean_r = _lane_sum(ext, base + wb, wd, math.nan) / wd
                    dist = abs(mean_r - mean_b)
                    # sd >= the floor: within k floors of the baseline needs no variance.
                    if dist > drift_k * drift_floor:
                        sd = math.sqrt(_lane_sum(ext, base, wb, mean_b) / (wb - 1))
                        if sd < drift_floor:
                            sd = drift_floor
                        off[i] = dist > drift_k * sd
                        score[i] = dist / sd if sd > 0.0 else math.inf
                    val[i] = mean_r
                start[i] = when[i]
            ev_i, ev_f, m = _events(
                _DRIFT, sid, na, verdicts, when, xei[j, _DRIFT], xef[j, _DRIFT], ev_i, ev_f, m
            )
        run_start = xsi[j, _S_RUN_START]
        run_count = xsi[j, _S_RUN_COUNT]
        if mask & (1 << _FLAT):
            flat_n = pi[s, _P_FLAT_N]
            flat_us = pi[s, _P_FLAT_US]
            for i in range(na):
                x = ext[h + i]
                if (i > 0 or has_prev) and x == (ext[h + i - 1] if i > 0 else prev):
                    run_count += 1
                else:
                    run_start = when[i]
                    run_count = 1
                dur = when[i] - run_start
                off[i] = (flat_n > 0 and run_count >= flat_n) or (flat_us > 0 and dur >= flat_us)
                score[i] = dur / 1e6
                val[i] = x
                start[i] = run_start
            ev_i, ev_f, m = _events(
                _FLAT, sid, na, verdicts, when, xei[j, _FLAT], xef[j, _FLAT], ev_i, ev_f, m
            )
        total = h + na
        keep = min(total, hcap)
        xpool[o : o + keep] = ext[total - keep : total]
        xsi[j, _S_LAST] = when[na - 1]
        xsi[j, _S_RUN_START] = run_start
        xsi[j, _S_RUN_COUNT] = run_count
        xsi[j, _S_HLEN] = keep
        xsf[j, _S_PREV] = ext[total - 1]
    return seg, xsi, xsf, xei, xef, xpool, xoff, ev_i[:m], ev_f[:m], late


@kernel
def _commit_kernel(
    seg: _I64,
    xsi: _I64,
    xsf: _F64,
    xei: _I64,
    xef: _F64,
    xpool: _F64,
    xoff: _I64,
    pi: _I64,
    si: _I64,
    sf: _F64,
    ei: _I64,
    ef: _F64,
    pool: _F64,
) -> None:
    """Copy the scratch state of a processed flush into the committed arrays."""
    for j in range(seg.shape[0]):
        s = seg[j]
        si[s] = xsi[j]
        sf[s] = xsf[j]
        ei[s] = xei[j]
        ef[s] = xef[j]
        size = pi[s, _P_HIST] + pi[s, _P_SPIKE_W]
        po = pi[s, _P_OFF]
        pool[po : po + size] = xpool[xoff[j] : xoff[j] + size]


# ---------------------------------------------------------------------------------------------
# The detector


class AnomalyDetector:
    """Per-sensor anomaly state, advanced one flush at a time, applied only after commit.

    Per flush: `assign` a rule to each sensor seen for the first time (`rule_for`), then
    `state_needed` for the flush's sensors and `restore` those from the database, then
    `process`; upsert `Pending.events` in the flush's transaction; `commit` after it committed.

    Not thread-safe: call it from one task or thread only. `process` runs one numba kernel over
    the whole flush with the GIL released, so it may run in a worker thread, as long as nothing
    else calls the detector meanwhile. Non-finite values (NaN, +-inf) are skipped entirely: they
    are in no window, break no flatline run and end no event. Sensors without a rule cost
    nothing. Results do not depend on how a sensor's stream is cut into flushes, nor on restarts
    (a new detector restored from the database), for readings that arrive in time order per
    sensor; a late reading (time not after the sensor's last one) is ignored and counted.
    """

    def __init__(self) -> None:
        self._rules: dict[int, AnomalyRule] = {}
        self._compiled: dict[AnomalyRule, _Compiled] = {}
        self._slot_of = np.full(0, -1, np.int32)
        self._free: list[int] = []
        self._used = 0
        self._pi = np.zeros((0, _NPI), np.int64)
        self._pf = np.zeros((0, _NPF), np.float64)
        self._si = np.zeros((0, _NSI), np.int64)
        self._sf = np.zeros((0, _NSF), np.float64)
        self._ei = np.zeros((0, 5, _NEI), np.int64)
        self._ef = np.zeros((0, 5, _NEF), np.float64)
        self._version = np.zeros(0, np.int64)
        self._restored = np.zeros(0, np.bool_)
        self._pool = np.zeros(0, np.float64)
        self._pool_used = 0

    # -- rules -----------------------------------------------------------------------------

    def assign(self, *, sensor_id: int, rule: AnomalyRule | None) -> None:
        """Set the rule of a sensor (None: no filters); a changed rule starts from no state."""
        sensor_id = operator.index(sensor_id)
        if sensor_id < 0 or sensor_id > np.iinfo(np.int32).max:
            raise ValueError(f"sensor_id must be a non-negative int32, got {sensor_id}")
        old = self._rules.get(sensor_id)
        if old == rule:
            return
        if old is not None:
            self._release(sensor_id)
        if rule is None:
            return
        compiled = self._compiled.get(rule)
        if compiled is None:
            compiled = self._compiled[rule] = _compile(rule)
        slot = self._take_slot()
        offset = self._alloc(compiled.size)
        if sensor_id >= self._slot_of.shape[0]:
            grown = np.full(max(sensor_id + 1, 2 * self._slot_of.shape[0]), -1, np.int32)
            grown[: self._slot_of.shape[0]] = self._slot_of
            self._slot_of = grown
        self._slot_of[sensor_id] = slot
        self._rules[sensor_id] = rule
        self._pi[slot] = compiled.ints
        self._pi[slot, _P_OFF] = offset
        self._pf[slot] = compiled.floats
        self._reset(slot)

    def rule(self, *, sensor_id: int) -> AnomalyRule | None:
        """The rule assigned to a sensor, None if it has none."""
        return self._rules.get(sensor_id)

    # -- rebuilding state --------------------------------------------------------------------

    def state_needed(self, *, sensor_ids: Iterable[int] | npt.NDArray[Any]) -> dict[int, StateNeed]:
        """For the given sensors that have a rule but no state yet: the history to restore from.

        The pipeline reads it from the database (finite readings committed before the flush
        about to be processed, and the sensor's open events) and calls `restore`. A sensor that
        is processed without `restore` starts from empty history, which is right only for a
        sensor new to the database.
        """
        given = sensor_ids if isinstance(sensor_ids, np.ndarray) else list(sensor_ids)
        ids = np.unique(np.asarray(given, np.int64))
        ids = ids[(ids >= 0) & (ids < self._slot_of.shape[0])]
        slots = self._slot_of[ids]
        ids = ids[slots >= 0]
        slots = slots[slots >= 0]
        ids = ids[~self._restored[slots]]
        return {int(i): self._compiled[self._rules[int(i)]].need for i in ids.tolist()}

    def restore(
        self,
        *,
        sensor_id: int,
        time: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        open_events: Iterable[Event],
    ) -> None:
        """Rebuild a sensor's state from its trailing readings and its open events.

        `time` and `value` are the sensor's last readings in time order, at least what
        `state_needed` asked for (more is fine, non-finite values are skipped). `open_events`
        are its events whose `end` is None. The result equals the state of a detector that saw
        the whole history, provided events were committed with the readings that caused them.
        A sensor without a rule is ignored.
        """
        sensor_id = operator.index(sensor_id)
        if sensor_id not in self._rules:
            return
        slot = int(self._slot_of[sensor_id])
        t = np.asarray(time, np.int64).ravel()
        v = np.asarray(value, np.float64).ravel()
        if t.shape != v.shape:
            raise ValueError("time and value must have the same length")
        keep = np.isfinite(v)
        t = t[keep]
        v = v[keep]
        if t.shape[0] > 1 and not bool(np.all(t[1:] > t[:-1])):
            raise ValueError("restore: times must be strictly increasing")
        events: dict[int, Event] = {}
        for ev in open_events:
            if ev.sensor != sensor_id or ev.end is not None or ev.kind not in _KIND_INDEX:
                raise ValueError(f"restore: not an open event of sensor {sensor_id}: {ev!r}")
            events[_KIND_INDEX[ev.kind]] = ev
        self._reset(slot)
        pi = self._pi[slot]
        mask, spike_w, hcap, off = (int(pi[c]) for c in (_P_MASK, _P_SPIKE_W, _P_HIST, _P_OFF))
        n = int(t.shape[0])
        if n:
            si = self._si[slot]
            si[_S_LAST] = t[-1]
            self._sf[slot, _S_PREV] = v[-1]
            if hcap:
                h = min(n, hcap)
                self._pool[off : off + h] = v[n - h :]
                si[_S_HLEN] = h
            if spike_w:
                w = min(n, spike_w)
                self._pool[off + hcap : off + hcap + w] = np.sort(v[n - w :])
            if mask & (1 << _FLAT):
                differs = np.flatnonzero(v != v[-1])
                run = n - int(differs[-1]) - 1 if differs.shape[0] else n
                si[_S_RUN_START] = t[n - run]
                si[_S_RUN_COUNT] = run
                if _FLAT in events:
                    si[_S_RUN_START] = events[_FLAT].start
                    si[_S_RUN_COUNT] = max(run, int(pi[_P_FLAT_N]))
        for k, ev in events.items():
            if mask & (1 << k):
                self._ei[slot, k] = (1, ev.start, t[-1] if n else ev.start)
                self._ef[slot, k] = (ev.value, ev.score)
        self._restored[slot] = True

    def forget(self, *, sensor_ids: Iterable[int]) -> None:
        """Drop the state of these sensors (keeping their rules): `state_needed` lists them again.

        For a sensor whose stream another container may have advanced meanwhile.
        """
        for sensor_id in map(operator.index, sensor_ids):
            if sensor_id in self._rules:
                self._reset(int(self._slot_of[sensor_id]))

    # -- the flush ---------------------------------------------------------------------------

    def process(
        self,
        *,
        sensor: npt.NDArray[np.int32],
        time: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
    ) -> Pending:
        """Run every filter over one flush (columns sorted by (sensor, time), keys unique).

        Changes nothing in the detector: pass the result to `commit` once the database
        transaction holding the flush and its events has committed, or drop it. Processing the
        same flush again then gives the same result. Raises ValueError on unsorted input.
        """
        s = np.require(sensor, np.int32, ["C", "W"])
        t = np.require(time, np.int64, ["C", "W"])
        v = np.require(value, np.float64, ["C", "W"])
        if not s.ndim == t.ndim == v.ndim == 1 or not s.shape[0] == t.shape[0] == v.shape[0]:
            raise ValueError("sensor, time and value must be 1-d columns of equal length")
        bad = int(_check_sorted(s, t))
        if bad >= 0:
            raise ValueError(f"readings are not sorted by (sensor, time) at row {bad}")
        seg, xsi, xsf, xei, xef, xpool, xoff, ev_i, ev_f, late = _process_kernel(
            s,
            t,
            v,
            self._slot_of,
            self._pi,
            self._pf,
            self._si,
            self._sf,
            self._ei,
            self._ef,
            self._pool,
        )
        events = []
        for (sid, k, start, end), (val, score) in zip(ev_i.tolist(), ev_f.tolist(), strict=True):
            events.append(
                Event(
                    sensor=sid,
                    kind=KINDS[k],
                    start=start,
                    end=None if end == _NO_TIME else end,
                    value=val,
                    score=score,
                    detail=_detail(k, val, score, self._rules[sid]),
                )
            )
        return Pending(
            owner=self,
            seg=seg,
            versions=self._version[seg],
            state=(xsi, xsf, xei, xef, xpool, xoff),
            events=tuple(events),
            late=int(late),
        )

    def commit(self, pending: Pending, /) -> None:
        """Apply a processed flush after its transaction committed.

        Raises RuntimeError if the pending belongs to another detector or is stale: a sensor in
        it was committed, restored, forgotten or reassigned since it was processed.
        """
        if pending._owner is not self:
            raise RuntimeError("commit: this pending belongs to another detector")
        if not np.array_equal(self._version[pending._seg], pending._versions):
            raise RuntimeError("commit: stale pending, its sensors changed since process()")
        xsi, xsf, xei, xef, xpool, xoff = pending._state
        _commit_kernel(
            pending._seg,
            xsi,
            xsf,
            xei,
            xef,
            xpool,
            xoff,
            self._pi,
            self._si,
            self._sf,
            self._ei,
            self._ef,
            self._pool,
        )
        self._version[pending._seg] += 1
        self._restored[pending._seg] = True

    # -- storage -----------------------------------------------------------------------------

    def _reset(self, slot: int) -> None:
        self._si[slot] = (_NO_TIME, 0, 0, 0)
        self._sf[slot] = 0.0
        self._ei[slot] = 0
        self._ef[slot] = 0.0
        self._version[slot] += 1
        self._restored[slot] = False

    def _release(self, sensor_id: int) -> None:
        slot = int(self._slot_of[sensor_id])
        self._slot_of[sensor_id] = -1
        del self._rules[sensor_id]
        self._pi[slot] = 0
        self._version[slot] += 1
        self._free.append(slot)

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._used
        if slot == self._pi.shape[0]:
            cap = max(64, 2 * slot)
            for name in ("_pi", "_pf", "_si", "_sf", "_ei", "_ef", "_version", "_restored"):
                old = getattr(self, name)
                new = np.zeros((cap, *old.shape[1:]), old.dtype)
                new[:slot] = old
                setattr(self, name, new)
        self._used += 1
        return slot

    def _alloc(self, size: int) -> int:
        """Room for `size` floats in the pool; compacts the live slots when it has to grow."""
        if self._pool_used + size > self._pool.shape[0]:
            live = [
                slot
                for slot in range(self._used)
                if self._pi[slot, _P_HIST] + self._pi[slot, _P_SPIKE_W] > 0
            ]
            total = sum(int(self._pi[s, _P_HIST] + self._pi[s, _P_SPIKE_W]) for s in live)
            pool = np.zeros(max(1024, 2 * (total + size)), np.float64)
            used = 0
            for slot in live:
                n = int(self._pi[slot, _P_HIST] + self._pi[slot, _P_SPIKE_W])
                off = int(self._pi[slot, _P_OFF])
                pool[used : used + n] = self._pool[off : off + n]
                self._pi[slot, _P_OFF] = used
                used += n
            self._pool = pool
            self._pool_used = used
        off = self._pool_used
        self._pool_used += size
        return off


def warm_up() -> None:
    """Compile or load from the on-disk cache every anomaly kernel (tiny input, all filters)."""
    rule = AnomalyRule(
        match="*",
        min=0.0,
        max=1.0,
        max_rate=1.0,
        spike_window=3,
        drift_window=1,
        drift_baseline=2,
        flatline_count=2,
    )
    detector = AnomalyDetector()
    detector.assign(sensor_id=0, rule=rule)
    detector.restore(
        sensor_id=0, time=np.array([0, 1], np.int64), value=np.array([0.5, 0.5]), open_events=()
    )
    pending = detector.process(
        sensor=np.zeros(5, np.int32),
        time=np.arange(2, 7, dtype=np.int64) * 1_000_000,
        value=np.array([0.5, 9.0, 0.4, np.nan, 0.4]),
    )
    detector.commit(pending)
