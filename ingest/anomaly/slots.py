"""The anomaly detector's storage: one slot per sensor with a rule in its state arrays (laid out
in ``ingest.anomaly.layout``), and a pool of floats for the windows; slots taken, reset and
grown, the pool compacted when it has to grow."""

from __future__ import annotations

import numpy as np

from ingest.anomaly.drift import empty as empty_sums
from ingest.anomaly.layout import (
    NEF,
    NEI,
    NK,
    NO_TIME,
    NPF,
    NPI,
    NSF,
    NSI,
    P_OFF,
    P_SIZE,
    S_AUTO_Q,
    S_DRIFT,
    S_LAST,
)


class Slots:
    """The arrays of ``ingest.anomaly.detector.AnomalyDetector``, which holds its sensors'
    rules and takes its lock around every change here."""

    def __init__(self) -> None:
        self._slot_of = np.full(0, -1, np.int32)
        self._free: list[int] = []
        self._used = 0
        self._pi = np.zeros((0, NPI), np.int64)
        self._pf = np.zeros((0, NPF), np.float64)
        self._si = np.zeros((0, NSI), np.int64)
        self._sf = np.zeros((0, NSF), np.float64)
        self._ei = np.zeros((0, NK, NEI), np.int64)
        self._ef = np.zeros((0, NK, NEF), np.float64)
        self._version = np.zeros(0, np.int64)
        self._restored = np.zeros(0, np.bool_)
        self._need = np.zeros((0, 2), np.int64)  # per slot: StateNeed's readings, span_us
        self._pool = np.zeros(0, np.float64)
        self._pool_used = 0

    def _reset(self, slot: int) -> None:
        self._si[slot] = 0
        self._si[slot, S_LAST] = NO_TIME
        empty_sums(self._si[slot], S_DRIFT)
        self._sf[slot] = 0.0
        self._sf[slot, S_AUTO_Q] = np.inf  # an empty window: no resolution yet
        self._ei[slot] = 0
        self._ef[slot] = 0.0
        self._version[slot] += 1
        self._restored[slot] = False

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._used
        if slot == self._pi.shape[0]:
            cap = max(64, 2 * slot)
            names = ("_pi", "_pf", "_si", "_sf", "_ei", "_ef", "_version", "_restored", "_need")
            for name in names:
                old = getattr(self, name)
                new = np.zeros((cap, *old.shape[1:]), old.dtype)
                new[:slot] = old
                setattr(self, name, new)
        self._used += 1
        return slot

    def _alloc(self, size: int) -> int:
        """Room for `size` floats in the pool; compacts the live slots when it has to grow."""
        if self._pool_used + size > self._pool.shape[0]:
            live = [slot for slot in range(self._used) if self._pi[slot, P_SIZE] > 0]
            total = sum(int(self._pi[s, P_SIZE]) for s in live)
            pool = np.zeros(max(1024, 2 * (total + size)), np.float64)
            used = 0
            for slot in live:
                n = int(self._pi[slot, P_SIZE])
                off = int(self._pi[slot, P_OFF])
                pool[used : used + n] = self._pool[off : off + n]
                self._pi[slot, P_OFF] = used
                used += n
            self._pool = pool
            self._pool_used = used
        off = self._pool_used
        self._pool_used += size
        return off
