"""Kernels of the adaptive detector (`detector = "auto"`): each reading judged against the median
of the window before it, in units of that window's own spread, never finer than the sensor's
resolution; and its state rebuilt from a sensor's trailing readings.

Every verdict is a function of the readings in its window alone (the window kept sorted, the
recent mean summed in time order), so it does not depend on how the stream was cut. The run of
offending readings that is not yet an event, and the quiet readings since an open event last
offended, are recomputed from the verdicts of the trailing readings at a restore.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ingest.anomaly.layout import (
    E_LAST,
    E_OPEN,
    E_SCORE,
    E_START,
    E_VALUE,
    F64,
    I64,
    MAD_SCALE,
    P_AUTO_AT,
    P_AUTO_G,
    P_AUTO_M,
    P_AUTO_R,
    P_AUTO_W,
    P_HIST,
    P_OFF,
    Q_AUTO_FLOOR,
    Q_AUTO_K,
    Q_AUTO_KR,
    S_AUTO_QUIET,
    S_AUTO_RUN,
    S_AUTO_SCORE,
    S_AUTO_START,
    S_AUTO_VALUE,
)
from ingest.anomaly.window import mad, median, ring_at, sorted_replace
from ingest.jit import kernel


@kernel
def smallest_gap(buf: F64, lo: int, w: int) -> float:
    """The smallest non-zero difference between neighbours of the sorted buf[lo : lo + w], 0.0
    if they are all equal: the resolution the window shows."""
    q = math.inf
    for p in range(lo + 1, lo + w):
        g = buf[p] - buf[p - 1]
        if 0.0 < g < q:
            q = g
    return 0.0 if q == math.inf else float(q)


@kernel
def _over(d: float, limit: float) -> float:
    """d over its threshold: inf if the threshold is 0 (as rounded) and d is not."""
    if limit > 0.0:
        return d / limit
    return math.inf if d > 0.0 else 0.0


@kernel
def judge(buf: F64, lo: int, w: int, x: float, r: float, k: float, kr: float, floor: float) -> Any:
    """(offends, score) of reading x with recent mean r against the sorted window buf[lo:lo+w].

    m = median, s = max(1.4826 MAD, floor, smallest gap); score = max(|x - m| / (k s),
    |r - m| / (kr s)), a term inf where its threshold rounds to 0 and its deviation is not 0;
    offends if score > 1. The MAD and the gap are looked at only when a deviation exceeds its
    threshold over the floor.
    """
    med = median(buf, lo, w)
    dev = abs(x - med)
    dr = abs(r - med)
    if dev <= k * floor and dr <= kr * floor:  # s >= floor
        return False, 0.0
    sigma = MAD_SCALE * mad(buf, lo, w, med)
    if sigma < floor:
        sigma = floor
    if dev <= k * sigma and dr <= kr * sigma:
        return False, 0.0
    q = smallest_gap(buf, lo, w)
    if sigma < q:
        sigma = q
    score = max(_over(dev, k * sigma), _over(dr, kr * sigma))
    return score > 1.0, score


@kernel
def auto_verdicts(
    xpool: F64,
    ao: int,
    pool: F64,
    po: int,
    r0: int,
    h: int,
    seen: int,
    ext: F64,
    e0: int,
    na: int,
    when: I64,
    pi: I64,
    pf: F64,
    verdicts: Any,
) -> None:
    """Verdicts on a sensor's na accepted readings ext[e0:] (readings seen.. of its history),
    its sorted window at xpool[ao:] advanced past them. `pi`/`pf` are its parameter rows."""
    off, score, val, start = verdicts
    w = pi[P_AUTO_W]
    nr = pi[P_AUTO_R]
    hcap = pi[P_HIST]
    k = pf[Q_AUTO_K]
    kr = pf[Q_AUTO_KR]
    floor = pf[Q_AUTO_FLOOR]
    for i in range(na):
        a = seen + i
        x = ext[e0 + i]
        off[i] = False
        score[i] = 0.0
        val[i] = x
        start[i] = when[i]
        full = a >= w
        if full:
            total = 0.0
            for b in range(a - nr + 1, a + 1):
                total += ring_at(pool, po, r0, h, hcap, seen, ext, e0, b)
            off[i], score[i] = judge(xpool, ao, w, x, total / nr, k, kr, floor)
        old = ring_at(pool, po, r0, h, hcap, seen, ext, e0, a - w) if full else 0.0
        sorted_replace(xpool, ao, min(a, w), old, x, full)


@kernel
def auto_restore(
    pool: F64,
    pi: I64,
    pf: F64,
    si: I64,
    sf: F64,
    oi: I64,
    of: F64,
    t: I64,
    v: F64,
) -> None:
    """The auto state of a restored slot from its finite readings (t, v): the sorted window,
    and from the verdicts of the last max(M - 1, G) readings the run not yet an event and,
    if `oi` says an event is open (its start, value and score set), its last offending
    reading and the quiet readings since. `pi`..`of` are the slot's rows."""
    n = v.shape[0]
    w = pi[P_AUTO_W]
    nr = pi[P_AUTO_R]
    lo = pi[P_OFF] + pi[P_HIST] + pi[P_AUTO_AT]
    k = pf[Q_AUTO_K]
    kr = pf[Q_AUTO_KR]
    floor = pf[Q_AUTO_FLOOR]
    first = max(0, n - max(pi[P_AUTO_M] - 1, pi[P_AUTO_G]))
    c = min(first, w)
    pool[lo : lo + c] = np.sort(v[first - c : first])
    run = 0
    run_start = 0
    run_value = 0.0
    run_score = 0.0
    quiet = 0
    last = oi[E_START]
    for a in range(first, n):
        x = v[a]
        full = a >= w
        bad = False
        sc = 0.0
        if full:
            total = 0.0
            for b in range(a - nr + 1, a + 1):
                total += v[b]
            bad, sc = judge(pool, lo, w, x, total / nr, k, kr, floor)
            sorted_replace(pool, lo, w, v[a - w], x, True)
        else:
            sorted_replace(pool, lo, a, 0.0, x, False)
        if bad:
            if run == 0 or sc > run_score:
                run_value = x
                run_score = sc
            if run == 0:
                run_start = t[a]
            run += 1
            quiet = 0
            last = t[a]
        else:
            run = 0
            quiet += 1
    si[S_AUTO_RUN] = run
    si[S_AUTO_START] = run_start
    sf[S_AUTO_VALUE] = run_value
    sf[S_AUTO_SCORE] = run_score
    if oi[E_OPEN] == 1:
        si[S_AUTO_QUIET] = quiet
        oi[E_LAST] = last
    else:
        si[S_AUTO_QUIET] = 0
        oi[E_START] = 0
        oi[E_LAST] = 0
        of[E_VALUE] = 0.0
        of[E_SCORE] = 0.0
