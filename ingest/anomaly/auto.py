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
    S_AUTO_Q,
    S_AUTO_QN,
    S_AUTO_QUIET,
    S_AUTO_RUN,
    S_AUTO_SCORE,
    S_AUTO_START,
    S_AUTO_VALUE,
)
from ingest.anomaly.sorted_window import bound_at, insert, mad, mad_bound, median
from ingest.anomaly.sorted_window import replace as sorted_replace
from ingest.jit import kernel


@kernel
def rescan(buf: F64, lo: int, w: int) -> Any:
    """The resolution of the sorted buf[lo : lo + w] afresh: its smallest non-zero gap between
    neighbours (inf if none) and how many neighbours are that far apart."""
    q = math.inf
    count = 0
    for p in range(lo + 1, lo + w):
        g = buf[p] - buf[p - 1]
        if 0.0 < g < q:
            q = g
            count = 1
        elif g == q:
            count += 1
    return q, count


@kernel
def _gap(g: float, q: float, count: int, sign: int) -> Any:
    """A gap between neighbours leaves (sign -1) or joins (+1) the resolution (q, count)."""
    if g <= 0.0:
        return q, count
    if sign < 0:
        return q, count - 1 if g == q else count
    if g < q:
        return g, 1
    return q, count + 1 if g == q else count


@kernel
def replace(buf: F64, lo: int, n: int, old: float, new: float, remove: bool, res: Any) -> Any:
    """In the sorted buf[lo : lo + n], replace one `old` by `new` if `remove`, else insert.
    Keeps the window's resolution `res` (q, count): only the gaps around the leaving and the
    arriving value change; the window is scanned again only when the last of its smallest
    gaps has left. Returns the new resolution."""
    q, count = res
    if remove:
        p, to = sorted_replace(buf, lo, n, old, new)
        # the neighbours `old` had, where the values between moved them
        left = p - 1 if to >= p else p
        right = p + 1 if to <= p else p
        if p > 0:
            q, count = _gap(old - buf[lo + left], q, count, -1)
        if p + 1 < n:
            q, count = _gap(buf[lo + right] - old, q, count, -1)
            if p > 0:
                q, count = _gap(buf[lo + right] - buf[lo + left], q, count, 1)
        at = lo + to
        m = n
    else:
        at = lo + insert(buf, lo, n, new)
        m = n + 1
    if at > lo and at + 1 < lo + m:
        q, count = _gap(buf[at + 1] - buf[at - 1], q, count, -1)
    if at > lo:
        q, count = _gap(new - buf[at - 1], q, count, 1)
    if at + 1 < lo + m:
        q, count = _gap(buf[at + 1] - new, q, count, 1)
    if count == 0 and q != math.inf:
        return rescan(buf, lo, m)
    return q, count


@kernel
def _over(d: float, limit: float) -> float:
    """d over its threshold: inf if the threshold is 0 (as rounded) and d is not."""
    if limit > 0.0:
        return d / limit
    return math.inf if d > 0.0 else 0.0


@kernel
def judge(
    buf: F64,
    lo: int,
    w: int,
    x: float,
    r: float,
    k: float,
    kr: float,
    floor: float,
    q: float,
    hint: int,
) -> Any:
    """(offends, score, hint) of reading x with recent mean r against the sorted window
    buf[lo:lo+w] whose resolution (smallest non-zero gap) is q; `hint` is where `mad_bound`
    starts (w // 4 will do), and the returned one where it ended.

    m = median, s = max(1.4826 MAD, floor, q); score = max(|x - m| / (k s), |r - m| / (kr s)),
    a term inf where its threshold rounds to 0 and its deviation is not 0; offends if
    score > 1. A reading whose deviations are within their thresholds over max(floor, q), or
    over s with a bound under the MAD in its place, is quiet without the MAD, and its score (0
    then) is never read: s is at least that (rounding is monotonic).
    """
    med = median(buf, lo, w)
    dev = abs(x - med)
    dr = abs(r - med)
    least = max(floor, q)
    if dev <= k * least and dr <= kr * least:  # s >= least
        return False, 0.0, hint
    low = max(MAD_SCALE * bound_at(buf, lo, w, med, hint), least)
    if dev <= k * low and dr <= kr * low:  # the bound where the last reading's ended
        return False, 0.0, hint
    low, hint = mad_bound(buf, lo, w, med, hint)
    low = max(MAD_SCALE * low, least)
    if dev <= k * low and dr <= kr * low:
        return False, 0.0, hint
    sigma = max(MAD_SCALE * mad(buf, lo, w, med, hint), least)
    score = max(_over(dev, k * sigma), _over(dr, kr * sigma))
    return score > 1.0, score, hint


@kernel
def auto_verdicts(
    xpool: F64,
    pool: F64,
    ext: F64,
    when: I64,
    where: Any,
    pi: I64,
    pf: F64,
    si: I64,
    sf: F64,
    verdicts: Any,
) -> None:
    """Verdicts on a sensor's na accepted readings ext[e0:] (readings seen.. of its history;
    `where` is (o, r0, h, seen, e0, na) as `process_flush` has them): its sorted window is
    copied to its scratch area at xpool[o:] and advanced past them, with its resolution in
    `si`/`sf`, its scratch state rows. `pi`/`pf` are its parameter rows."""
    o, r0, h, seen, e0, na = where
    off, score, val, start = verdicts
    po = pi[P_OFF]
    ao = o + pi[P_AUTO_AT]
    pa = po + pi[P_HIST] + pi[P_AUTO_AT]
    xpool[ao : ao + pi[P_AUTO_W]] = pool[pa : pa + pi[P_AUTO_W]]
    w = pi[P_AUTO_W]
    nr = pi[P_AUTO_R]
    hcap = pi[P_HIST]
    k = pf[Q_AUTO_K]
    kr = pf[Q_AUTO_KR]
    floor = pf[Q_AUTO_FLOOR]
    res = (sf[S_AUTO_Q], si[S_AUTO_QN])
    hint = w // 4
    for i in range(na):
        a = seen + i
        x = ext[e0 + i]
        off[i] = False
        score[i] = 0.0
        val[i] = x
        start[i] = when[i]
        full = a >= w
        old = 0.0
        if full:
            # readings b < seen from the ring (as `ring_at` reads them, inline: a call per
            # reading that passes arrays costs more than the reading)
            total = 0.0
            for b in range(a - nr + 1, a + 1):
                if b >= seen:
                    total += ext[e0 + b - seen]
                else:
                    slot = r0 + b - seen + h
                    total += pool[po + slot - hcap if slot >= hcap else po + slot]
            q = res[0] if res[0] != math.inf else 0.0
            off[i], score[i], hint = judge(xpool, ao, w, x, total / nr, k, kr, floor, q, hint)
            b = a - w
            if b >= seen:
                old = ext[e0 + b - seen]
            else:
                slot = r0 + b - seen + h
                old = pool[po + slot - hcap if slot >= hcap else po + slot]
        res = replace(xpool, ao, min(a, w), old, x, full, res)
    sf[S_AUTO_Q], si[S_AUTO_QN] = res


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
    res = rescan(pool, lo, c)
    run = 0
    run_start = 0
    run_value = 0.0
    run_score = 0.0
    quiet = 0
    last = oi[E_START]
    hint = w // 4
    for a in range(first, n):
        x = v[a]
        full = a >= w
        bad = False
        sc = 0.0
        if full:
            total = 0.0
            for b in range(a - nr + 1, a + 1):
                total += v[b]
            q = res[0] if res[0] != math.inf else 0.0
            bad, sc, hint = judge(pool, lo, w, x, total / nr, k, kr, floor, q, hint)
        res = replace(pool, lo, min(a, w), v[a - w] if full else 0.0, x, full, res)
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
    sf[S_AUTO_Q], si[S_AUTO_QN] = res
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
