"""The anomaly filters' state, laid out in flat numba-friendly arrays: event kinds, rule
parameters, per-slot state and open events. `ingest.anomaly.detector` owns the arrays; the
kernels in `ingest.anomaly.filters` read and write them.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.anomaly.drift import NC

KINDS: Final = ("range", "rate", "spike", "drift", "flatline", "auto")
"""Event kinds; a kind's index in this tuple is its bit in the kernels' filter mask."""
NK: Final = len(KINDS)

MAD_SCALE: Final = 1.4826
"""Scales a median absolute deviation to a standard deviation for normal data (Hampel)."""

NO_TIME: Final = -(2**63)
RANGE, RATE, SPIKE, DRIFT, FLAT, AUTO = 0, 1, 2, 3, 4, 5

# Rule parameters per slot (written by assign, read-only in the kernels): P_SIZE is the size of
# the slot's pool area, P_OFF where it starts; P_AUTO_AT where the auto window starts in it,
# past the ring.
P_MASK, P_SPIKE_W, P_DRIFT_W, P_DRIFT_B, P_FLAT_N, P_FLAT_US, P_HIST, P_OFF, P_SIZE = range(9)
P_AUTO_W, P_AUTO_R, P_AUTO_M, P_AUTO_G, P_AUTO_AT = range(9, 14)
NPI: Final = 14
Q_MIN, Q_MAX, Q_RATE, Q_SPIKE_K, Q_SPIKE_FLOOR, Q_DRIFT_K, Q_DRIFT_FLOOR = range(7)
Q_AUTO_K, Q_AUTO_KR, Q_AUTO_FLOOR = range(7, 10)
NPF: Final = 10
# Mutable state per slot: last time, flatline run, finite readings seen (the last `hist` of
# them are in the pool), then drift's counts (`ingest.anomaly.drift`, from S_DRIFT); last value. A
# slot's pool area holds its last `hist` finite values as a ring (reading a at a % hist), then
# the spike window sorted, then drift's running sums (DRIFT_SIZE floats, if it has drift), then
# the auto window sorted. The auto detector's run of offending readings not yet an event (its
# length, first reading's time, worst value and score), the readings since its open event
# last offended, and its window's resolution: the smallest non-zero gap between neighbours of
# the sorted window (inf: none) and how many neighbours are that far apart.
S_LAST, S_RUN_START, S_RUN_COUNT, S_SEEN, S_DRIFT = range(5)
S_AUTO_RUN, S_AUTO_START, S_AUTO_QUIET, S_AUTO_QN = range(S_DRIFT + NC, S_DRIFT + NC + 4)
NSI: Final = S_DRIFT + NC + 4
S_PREV, S_AUTO_VALUE, S_AUTO_SCORE, S_AUTO_Q = range(4)
NSF: Final = 4
# Open-event state per slot and kind.
E_OPEN, E_START, E_LAST = range(3)
NEI: Final = 3
E_VALUE, E_SCORE = range(2)
NEF: Final = 2

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
