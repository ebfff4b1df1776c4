"""A sensor's anomaly state rebuilt from its trailing readings and its open events, into its
slot of the detector's arrays (`AnomalyDetector.restore`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ingest.anomaly.auto import auto_restore
from ingest.anomaly.filters import fill_drift
from ingest.anomaly.layout import (
    AUTO,
    DRIFT,
    F64,
    FLAT,
    I64,
    P_FLAT_N,
    P_HIST,
    P_MASK,
    P_OFF,
    P_SPIKE_W,
    S_LAST,
    S_PREV,
    S_RUN_COUNT,
    S_RUN_START,
    S_SEEN,
)
from ingest.anomaly.ranked import clear as clear_ranks

if TYPE_CHECKING:
    from ingest.anomaly.pending import Event

__all__ = ["rebuild"]


def rebuild(
    arrays: tuple[F64, I64, F64, I64, F64, I64, F64],
    slot: int,
    t: I64,
    v: F64,
    events: dict[int, Event],
) -> None:
    """Fill a reset slot from its finite readings (t, v), in time order, and its open events
    by kind index. `arrays` are the detector's pool, parameters (ints, floats), state (ints,
    floats) and open events (ints, floats)."""
    pool, pis, pfs, sis, sfs, eis, efs = arrays
    pi = pis[slot]
    mask, spike_w, hcap, off = (int(pi[c]) for c in (P_MASK, P_SPIKE_W, P_HIST, P_OFF))
    n = int(t.shape[0])
    if n:
        si = sis[slot]
        si[S_LAST] = t[-1]
        si[S_SEEN] = n
        sfs[slot, S_PREV] = v[-1]
        if hcap:
            h = min(n, hcap)
            ring = np.arange(n - h, n) % hcap  # reading a at a % hcap
            pool[off + ring] = v[n - h :]
        if spike_w:
            w = min(n, spike_w)
            pool[off + hcap : off + hcap + w] = np.sort(v[n - w :])
        if mask & (1 << DRIFT):
            fill_drift(pool, sis, pis, slot, v)
        if mask & (1 << FLAT):
            differs = np.flatnonzero(v != v[-1])
            run = n - int(differs[-1]) - 1 if differs.shape[0] else n
            si[S_RUN_START] = t[n - run]
            si[S_RUN_COUNT] = run
            if FLAT in events:
                si[S_RUN_START] = events[FLAT].start
                si[S_RUN_COUNT] = max(run, int(pi[P_FLAT_N]))
    if spike_w:
        clear_ranks(pool, off + hcap, spike_w)
    for k, ev in events.items():
        if mask & (1 << k):
            eis[slot, k] = (1, ev.start, t[-1] if n else ev.start)
            efs[slot, k] = (ev.value, ev.score)
    if mask & (1 << AUTO):
        rows = (pis[slot], pfs[slot], sis[slot], sfs[slot], eis[slot, AUTO], efs[slot, AUTO])
        auto_restore(pool, *rows, t, v)
