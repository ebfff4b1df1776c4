"""Anomaly filters per sensor (range, rate, spike, drift, flatline): state, restore, commit."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ingest.anomaly.filters import commit_flush, process_flush
from ingest.anomaly.layout import (
    AUTO,
    E_OPEN,
    E_START,
    FLAT,
    KINDS,
    NO_TIME,
    P_AUTO_G,
    P_MASK,
    P_OFF,
    S_AUTO_RUN,
    S_AUTO_START,
    S_LAST,
    S_RUN_COUNT,
    S_RUN_START,
    S_SEEN,
)
from ingest.anomaly.locking import SharedLock, reads, writes
from ingest.anomaly.params import Compiled, StateNeed, compile_rule
from ingest.anomaly.pending import Base, Event, EventColumns, Outcome, Pending
from ingest.anomaly.rebuild import rebuild
from ingest.anomaly.rules import AnomalyRule
from ingest.anomaly.slots import Slots
from ingest.kernels import check_sorted

__all__ = [
    "KINDS",
    "AnomalyDetector",
    "Base",
    "Event",
    "EventColumns",
    "Outcome",
    "Pending",
    "StateNeed",
    "compile_kernels",
]

_KIND_INDEX: Final = {kind: i for i, kind in enumerate(KINDS)}


class AnomalyDetector(Slots):
    """Per-sensor anomaly state, advanced one flush at a time, applied only after commit.

    Per flush: `assign` a rule to each sensor seen for the first time (`rule_for`), then
    `state_needed` for the flush's sensors and `restore` those from the database, then
    `process`; upsert `Pending.columns()` in the flush's transaction; `commit` after it committed.

    Thread-safe. `process` only reads the committed state and runs one numba kernel over the
    whole flush with the GIL released: several `process` calls (the writers' worker threads,
    each with its part of a flush) run at once. `assign`, `restore`, `forget` and `commit`
    change the state: each waits until no `process` is running, and holds the others off
    while it runs (`guard`, a lock per detector, taken once per call).

    Non-finite values (NaN, +-inf) are skipped entirely: they are in no window, break no
    flatline run and end no event. Sensors without a rule cost nothing. Results do not depend
    on how a sensor's stream is cut into flushes, nor on restarts (a new detector restored
    from the database), for readings that arrive in time order per sensor; a late reading
    (time not after the sensor's last one) is ignored and counted.
    """

    def __init__(self) -> None:
        self._rules: dict[int, AnomalyRule] = {}
        self._compiled: dict[AnomalyRule, Compiled] = {}
        super().__init__()
        self.guard = SharedLock()

    # -- rules -----------------------------------------------------------------------------

    @writes
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
            compiled = self._compiled[rule] = compile_rule(rule)
        slot = self._take_slot()
        offset = self._alloc(compiled.size)
        if sensor_id >= self._slot_of.shape[0]:
            grown = np.full(max(sensor_id + 1, 2 * self._slot_of.shape[0]), -1, np.int32)
            grown[: self._slot_of.shape[0]] = self._slot_of
            self._slot_of = grown
        self._slot_of[sensor_id] = slot
        self._rules[sensor_id] = rule
        self._pi[slot] = compiled.ints
        self._pi[slot, P_OFF] = offset
        self._pf[slot] = compiled.floats
        self._need[slot] = (compiled.need.readings, compiled.need.span_us)
        self._reset(slot)

    def rule(self, *, sensor_id: int) -> AnomalyRule | None:
        """The rule assigned to a sensor, None if it has none."""
        return self._rules.get(sensor_id)

    # -- rebuilding state --------------------------------------------------------------------

    @reads
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

    @writes
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
        arrays = (self._pool, self._pi, self._pf, self._si, self._sf, self._ei, self._ef)
        rebuild(arrays, slot, t, v, events)
        self._restored[slot] = True

    def with_rule(self, sensor: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_]:
        """Which of these sensor ids have a rule."""
        slot_of = self._slot_of  # one reference: `assign` may replace the array meanwhile
        if not slot_of.shape[0]:
            return np.zeros(sensor.shape[0], np.bool_)
        inside = (sensor >= 0) & (sensor < slot_of.shape[0])
        return inside & (slot_of[np.where(inside, sensor, 0)] >= 0)

    @reads
    def base(self, *, sensor_ids: npt.NDArray[np.int32]) -> Base:
        """The committed state of sensors with a rule, as far as a restore or replay needs."""
        slots = self._slot_of[sensor_ids]
        si, ei = self._si[slots], self._ei[slots]
        is_open = ei[:, :, E_OPEN] == 1
        starts = np.where(is_open, ei[:, :, E_START], np.iinfo(np.int64).max).min(axis=1)
        mask = self._pi[slots, P_MASK]
        ran = (si[:, S_RUN_COUNT] > 0) & ((mask & (1 << FLAT)) != 0)
        run_start = np.where(ran, si[:, S_RUN_START], NO_TIME)
        # auto: the offending run that is not yet an event
        pending = (si[:, S_AUTO_RUN] > 0) & ((mask & (1 << AUTO)) != 0) & ~is_open[:, AUTO]
        pending_start = np.where(pending, si[:, S_AUTO_START], NO_TIME)
        run_start = np.where(
            (run_start == NO_TIME) | (pending & (pending_start < run_start)),
            pending_start,
            run_start,
        )
        return Base(
            last=si[:, S_LAST].copy(),
            open_since=np.where(is_open.any(axis=1), starts, NO_TIME),
            run_start=run_start,
            gap=np.maximum(self._pi[slots, P_AUTO_G], 1),
            need_readings=self._need[slots, 0].copy(),
            need_span_us=self._need[slots, 1].copy(),
        )

    @writes
    def forget(self, *, sensor_ids: Iterable[int]) -> None:
        """Drop the state of these sensors (keeping their rules): `state_needed` lists them again.

        For a sensor whose stream another container may have advanced meanwhile.
        """
        for sensor_id in map(operator.index, sensor_ids):
            if sensor_id in self._rules:
                self._reset(int(self._slot_of[sensor_id]))

    # -- the flush ---------------------------------------------------------------------------

    @reads
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
        bad = int(check_sorted(s, t))
        if bad >= 0:
            raise ValueError(f"readings are not sorted by (sensor, time) at row {bad}")
        seg, xsi, xsf, xei, xef, xpool, xoff, ext, seg_lo, ev_i, ev_f, late = process_flush(
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
        # the rules of the sensors with events as of now (for their details, built later)
        rules = {sid: self._rules[sid] for sid in np.unique(ev_i[:, 0]).tolist()}
        return Pending(
            owner=self,
            seg=seg,
            versions=self._version[seg],
            state=(xsi, xsf, xei, xef, xpool, xoff, ext, seg_lo),
            sensors=s[seg_lo],
            before=self._si[seg, S_SEEN],
            need=self._need[seg],
            ev_i=ev_i,
            ev_f=ev_f,
            rules=rules,
            late=int(late),
        )

    @writes
    def commit(self, pending: Pending, /) -> None:
        """Apply a processed flush after its transaction committed.

        Raises RuntimeError if the pending belongs to another detector or is stale: a sensor in
        it was committed, restored, forgotten or reassigned since it was processed.
        """
        if pending._owner is not self:
            raise RuntimeError("commit: this pending belongs to another detector")
        if not np.array_equal(self._version[pending._seg], pending._versions):
            raise RuntimeError("commit: stale pending, its sensors changed since process()")
        xsi, xsf, xei, xef, xpool, xoff, ext, seg_lo = pending._state
        commit_flush(
            pending._seg,
            xsi,
            xsf,
            xei,
            xef,
            xpool,
            xoff,
            ext,
            seg_lo,
            self._pi,
            self._si,
            self._sf,
            self._ei,
            self._ef,
            self._pool,
        )
        self._version[pending._seg] += 1
        self._restored[pending._seg] = True

    # -- storage (the arrays: ``ingest.anomaly.slots``) ------------------------------------

    def _release(self, sensor_id: int) -> None:
        slot = int(self._slot_of[sensor_id])
        self._slot_of[sensor_id] = -1
        del self._rules[sensor_id]
        self._pi[slot] = 0
        self._version[slot] += 1
        self._free.append(slot)


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, every anomaly kernel (tiny input, all filters;
    see `ingest.warmup`)."""
    rule = AnomalyRule(
        match="*",
        min=0.0,
        max=1.0,
        max_rate=1.0,
        spike_window=3,
        drift_window=1,
        drift_baseline=2,
        flatline_count=2,
        detector="auto",
        auto_window=8,
        auto_recent=2,
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
