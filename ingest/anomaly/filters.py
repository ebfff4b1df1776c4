"""Numba kernels of the anomaly filters: one pass over a flush (every filter, with the events
it opens and closes), and applying that pass once committed.

The state they work on is laid out in `ingest.anomaly.layout`; `ingest.anomaly.detector` owns
it and is the only caller.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.anomaly.auto import auto_verdicts
from ingest.anomaly.drift import DRIFT_SIZE, drift_verdicts, restore_sums, workspace
from ingest.anomaly.events import events, gated_events
from ingest.anomaly.layout import (
    AUTO,
    DRIFT,
    F64,
    FLAT,
    I64,
    NEF,
    NEI,
    NK,
    NO_TIME,
    NSF,
    NSI,
    P_AUTO_AT,
    P_AUTO_G,
    P_AUTO_M,
    P_AUTO_W,
    P_DRIFT_B,
    P_DRIFT_W,
    P_FLAT_N,
    P_FLAT_US,
    P_HIST,
    P_MASK,
    P_OFF,
    P_SIZE,
    P_SPIKE_W,
    Q_DRIFT_FLOOR,
    Q_DRIFT_K,
    Q_MAX,
    Q_MIN,
    Q_RATE,
    Q_SPIKE_FLOOR,
    Q_SPIKE_K,
    RANGE,
    RATE,
    S_AUTO_RUN,
    S_AUTO_VALUE,
    S_DRIFT,
    S_LAST,
    S_PREV,
    S_RUN_COUNT,
    S_RUN_START,
    S_SEEN,
    SPIKE,
)
from ingest.anomaly.ranked import size as spike_size
from ingest.anomaly.spike import spike_verdicts
from ingest.jit import kernel


@kernel
def fill_drift(pool: F64, si: I64, pi: I64, slot: int, v: F64) -> None:
    """Drift's sums of a restored slot, as of the last of its finite readings v."""
    plo = pi[slot, P_OFF] + pi[slot, P_HIST] + spike_size(pi[slot, P_SPIKE_W])
    restore_sums(pool, plo, si[slot], S_DRIFT, v, pi[slot, P_DRIFT_W], pi[slot, P_DRIFT_B])


@kernel
def process_flush(
    sensor: npt.NDArray[np.int32],
    time: I64,
    value: F64,
    slot_of: npt.NDArray[np.int32],
    pi: I64,
    pf: F64,
    si: I64,
    sf: F64,
    ei: I64,
    ef: F64,
    pool: F64,
) -> Any:
    """Run the filters over sorted columns; the new state goes to scratch copies, not `si`...

    Per sensor: the finite, timely readings are gathered (into `ext`, at the sensor's rows);
    older readings come from the sensor's ring in `pool`. Each filter in turn judges them all
    and `events` turns its verdicts into events. The scratch state per sensor is its int and
    float state, its open events, and its pool area past the ring (spike window, drift sums).
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
    widest = 0  # the largest drift window, recent and baseline
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
                size += pi[slot, P_SIZE] - pi[slot, P_HIST]
                if pi[slot, P_MASK] & (1 << DRIFT):
                    widest = max(widest, pi[slot, P_DRIFT_W] + pi[slot, P_DRIFT_B])
            current = slot >= 0
        if current:
            seg_hi[j] = i + 1
    for j in range(nseg):
        longest = max(longest, seg_hi[j] - seg_lo[j])
    xsi = np.empty((nseg, NSI), np.int64)
    xsf = np.empty((nseg, NSF), np.float64)
    xei = np.empty((nseg, NK, NEI), np.int64)
    xef = np.empty((nseg, NK, NEF), np.float64)
    xpool = np.empty(size, np.float64)
    ext = np.empty(n, np.float64)  # each sensor's accepted values, from its first row
    ev_i = np.empty((16 + nseg, 4), np.int64)
    ev_f = np.empty((16 + nseg, 2), np.float64)
    m = 0
    late = 0
    when = np.empty(longest, np.int64)  # times of the accepted values
    off = np.empty(longest, np.bool_)
    score = np.empty(longest, np.float64)
    val = np.empty(longest, np.float64)
    start = np.empty(longest, np.int64)
    verdicts = (off, score, val, start)
    work = workspace(widest)
    for j in range(nseg):
        s = seg[j]
        xsi[j] = si[s]
        xsf[j] = sf[s]
        xei[j] = ei[s]
        xef[j] = ef[s]
        mask = pi[s, P_MASK]
        hcap = pi[s, P_HIST]
        spike_w = pi[s, P_SPIKE_W]
        spike_n = spike_size(spike_w)
        o = xoff[j]
        po = pi[s, P_OFF]
        last = xsi[j, S_LAST]
        has_prev = last != NO_TIME
        prev = xsf[j, S_PREV]
        seen = xsi[j, S_SEEN]
        h = min(seen, hcap)
        r0 = (seen - h) % hcap if hcap > 0 else 0
        e0 = seg_lo[j]
        na = 0
        for i in range(seg_lo[j], seg_hi[j]):
            x = value[i]
            if not math.isfinite(x):
                continue
            t = time[i]
            if has_prev and t <= last:  # times rise within a sensor: only old ones are late
                late += 1
                continue
            ext[e0 + na] = x
            when[na] = t
            na += 1
        if na == 0:
            continue
        sid = sensor[seg_lo[j]]
        if mask & (1 << RANGE):
            lo_limit = pf[s, Q_MIN]
            hi_limit = pf[s, Q_MAX]
            for i in range(na):
                x = ext[e0 + i]
                off[i] = x > hi_limit or x < lo_limit
                if off[i]:  # score, value and start are read only where a reading offends
                    score[i] = x - hi_limit if x > hi_limit else lo_limit - x
                    val[i] = x
                    start[i] = when[i]
            ev_i, ev_f, m = events(
                RANGE, sid, na, verdicts, when, xei[j, RANGE], xef[j, RANGE], ev_i, ev_f, m
            )
        if mask & (1 << RATE):
            max_rate = pf[s, Q_RATE]
            for i in range(na):
                x = ext[e0 + i]
                off[i] = False
                if i > 0 or has_prev:
                    px = ext[e0 + i - 1] if i > 0 else prev
                    pt = when[i - 1] if i > 0 else last
                    rate = abs(x - px) / (float(when[i] - pt) / 1e6)
                    off[i] = rate > max_rate
                    if off[i]:  # score, value and start are read only where a reading offends
                        score[i] = rate / max_rate
                        val[i] = x
                        start[i] = when[i]
            ev_i, ev_f, m = events(
                RATE, sid, na, verdicts, when, xei[j, RATE], xef[j, RATE], ev_i, ev_f, m
            )
        if mask & (1 << SPIKE):
            xpool[o : o + spike_n] = pool[po + hcap : po + hcap + spike_n]
            spike_verdicts(
                (pool, po, r0, h, hcap, seen, ext, e0),
                na,
                xpool,
                o,
                spike_w,
                (pf[s, Q_SPIKE_K], pf[s, Q_SPIKE_FLOOR]),
                verdicts,
                when,
            )
            ev_i, ev_f, m = events(
                SPIKE, sid, na, verdicts, when, xei[j, SPIKE], xef[j, SPIKE], ev_i, ev_f, m
            )
        if mask & (1 << DRIFT):
            plo = o + spike_n
            xpool[plo : plo + DRIFT_SIZE] = pool[
                po + hcap + spike_n : po + hcap + spike_n + DRIFT_SIZE
            ]
            drift_verdicts(
                (pool, po, r0, h, hcap, seen, ext, e0),
                na,
                xpool,
                plo,
                xsi[j],
                S_DRIFT,
                (pi[s, P_DRIFT_W], pi[s, P_DRIFT_B], pf[s, Q_DRIFT_K], pf[s, Q_DRIFT_FLOOR]),
                verdicts,
                when,
                work,
            )
            ev_i, ev_f, m = events(
                DRIFT, sid, na, verdicts, when, xei[j, DRIFT], xef[j, DRIFT], ev_i, ev_f, m
            )
        run_start = xsi[j, S_RUN_START]
        run_count = xsi[j, S_RUN_COUNT]
        if mask & (1 << FLAT):
            flat_n = pi[s, P_FLAT_N]
            flat_us = pi[s, P_FLAT_US]
            for i in range(na):
                x = ext[e0 + i]
                if (i > 0 or has_prev) and x == (ext[e0 + i - 1] if i > 0 else prev):
                    run_count += 1
                else:
                    run_start = when[i]
                    run_count = 1
                dur = when[i] - run_start
                off[i] = (flat_n > 0 and run_count >= flat_n) or (flat_us > 0 and dur >= flat_us)
                if off[i]:
                    score[i] = dur / 1e6
                    val[i] = x
                    start[i] = run_start
            ev_i, ev_f, m = events(
                FLAT, sid, na, verdicts, when, xei[j, FLAT], xef[j, FLAT], ev_i, ev_f, m
            )
        if mask & (1 << AUTO):
            where = (o, r0, h, seen, e0, na)
            auto_verdicts(xpool, pool, ext, when, where, pi[s], pf[s], xsi[j], xsf[j], verdicts)
            gate = (pi[s, P_AUTO_M], pi[s, P_AUTO_G], S_AUTO_RUN, S_AUTO_VALUE)
            ev_i, ev_f, m = gated_events(
                AUTO,
                sid,
                na,
                verdicts,
                when,
                xei[j, AUTO],
                xef[j, AUTO],
                xsi[j],
                xsf[j],
                gate,
                ev_i,
                ev_f,
                m,
            )
        xsi[j, S_LAST] = when[na - 1]
        xsi[j, S_RUN_START] = run_start
        xsi[j, S_RUN_COUNT] = run_count
        xsi[j, S_SEEN] = seen + na
        xsf[j, S_PREV] = ext[e0 + na - 1]
    return seg, xsi, xsf, xei, xef, xpool, xoff, ext, seg_lo, ev_i[:m], ev_f[:m], late


@kernel
def commit_flush(
    seg: I64,
    xsi: I64,
    xsf: F64,
    xei: I64,
    xef: F64,
    xpool: F64,
    xoff: I64,
    ext: F64,
    seg_lo: I64,
    pi: I64,
    si: I64,
    sf: F64,
    ei: I64,
    ef: F64,
    pool: F64,
) -> None:
    """Copy the scratch state of a processed flush into the committed arrays, and its accepted
    readings into each sensor's ring."""
    for j in range(seg.shape[0]):
        s = seg[j]
        hcap = pi[s, P_HIST]
        spike_n = spike_size(pi[s, P_SPIKE_W])
        po = pi[s, P_OFF]
        seen = si[s, S_SEEN]
        total = xsi[j, S_SEEN]
        if total == seen:  # no reading accepted: nothing changed (nor was copied to scratch)
            continue
        if hcap > 0:
            first = max(seen, total - hcap)
            q = first % hcap
            for a in range(first, total):
                pool[po + q] = ext[seg_lo[j] + a - seen]
                q += 1
                if q == hcap:
                    q = 0
        o = xoff[j]
        pool[po + hcap : po + hcap + spike_n] = xpool[o : o + spike_n]
        if pi[s, P_MASK] & (1 << DRIFT):
            at = po + hcap + spike_n
            pool[at : at + DRIFT_SIZE] = xpool[o + spike_n : o + spike_n + DRIFT_SIZE]
        if pi[s, P_MASK] & (1 << AUTO):
            at = pi[s, P_AUTO_AT]
            w = pi[s, P_AUTO_W]
            pool[po + hcap + at : po + hcap + at + w] = xpool[o + at : o + at + w]
        si[s] = xsi[j]
        sf[s] = xsf[j]
        ei[s] = xei[j]
        ef[s] = xef[j]
