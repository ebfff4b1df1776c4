"""Asset health in the flush: each device's readings scored against its model, from a state
that the database holds, so that any number of ingesters give what one gives.

A device is scored when an asset rule matches its path and `ingest baseline` stored a model
for it. Its events are a function of its stored readings: its model sensors' readings taken in
time order (`ingest.asset.kernel.advance`). Per flush, with its readings written, the state rows
of its devices are locked (`ingest.db.asset_state.lock`) and:

- a device whose new readings all lie after its newest scored timestamp is advanced from the
  locked state (the carried values and the open run: the whole state, a few numbers), all such
  devices of the flush in one kernel call (`ingest.asset.scoring.advance`);
- a device with new readings at or before it (a late batch, another ingester's later batch
  committed first, or the device's sensors in separate messages) is re-scored: its stored
  readings from `replay_s` (plus `hold_s`) before its oldest new reading are run from an empty
  state, the latest quiet timestamp before that reading is found (scored, not offending, and
  no offending timestamp within `gap_s` before it: no run is in progress after it, in that run
  as in the original one), and the events starting after it are replaced by the run's. With no
  quiet timestamp in reach, or readings more than `anomaly.replay_max_s` before the newest scored
  timestamp, the late readings are not scored (`ingest_asset_late_readings_total`) and the
  readings after the newest scored timestamp are advanced as usual.

The model is read from the database in the flush that uses it (its version is checked under the
lock), so a refit takes effect for every ingester at the same flush.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import msgspec
import numpy as np
import numpy.typing as npt

from ingest.anomaly.pending import Event
from ingest.asset import kernel as k
from ingest.asset import scoring
from ingest.asset.rules import AssetRule, asset_rule_for
from ingest.db import asset_state as db
from ingest.db.asset_state import DELETE_EVENTS_SQL, UPDATE_SQL
from ingest.db.registry import Registry
from ingest.db.sink import Readings, Upsert

__all__ = ["AssetScorer", "AssetSettled"]


@dataclass(slots=True)
class AssetSettled:
    """A flush's asset outcome, written in its transaction: deletes of re-scored spans first,
    then the events and the state rows."""

    deletes: list[Upsert]
    events: list[Event]
    update: Upsert
    timestamps: int = 0
    replays: int = 0
    late: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class AssetScorer:
    """Scores a flush's devices. Called from the writer task; `settle` calls for disjoint sets of
    devices may interleave (the writer connections' parts of one flush)."""

    def __init__(
        self, *, rules: Sequence[AssetRule], registry: Registry, replay_max_us: int
    ) -> None:
        self._rules = tuple(rules)
        self._max = replay_max_us  # anomaly.replay_max_s: how late a reading may be scored
        self._registry = registry
        self._rule_of: dict[int, AssetRule | None] = {}  # by sensor id
        self._models: dict[int, db.Model] = {}  # by device id: a cache, checked by version
        self._keys = np.full(1024, -1, np.int64)  # by sensor id: its part key, -1 unknown
        self._scored = np.zeros(1024, np.bool_)  # by sensor id: its device has a rule

    @property
    def enabled(self) -> bool:
        return bool(self._rules)

    def _rule(self, sensor_id: int) -> AssetRule | None:
        rule = self._rule_of.get(sensor_id, False)
        if rule is False:
            device, _ = self._registry.name_of(sensor_id)
            rule = self._rule_of[sensor_id] = asset_rule_for(rules=self._rules, device=device)
        return rule  # type: ignore[return-value]

    def part_keys(self, sensor: npt.NDArray[np.int32]) -> npt.NDArray[np.int64]:
        """A key per reading that keeps a scored device's sensors in one part of a split flush
        (its device path's CRC), and other sensors spread by id."""
        keys = sensor.astype(np.int64)
        if not self._rules or not len(sensor):
            return keys
        top = int(sensor.max())
        if top >= len(self._keys):
            grown = np.full(max(top + 1, 2 * len(self._keys)), -1, np.int64)
            grown[: len(self._keys)] = self._keys
            self._keys = grown
            scored = np.zeros(len(grown), np.bool_)
            scored[: len(self._scored)] = self._scored
            self._scored = scored
        ids = np.unique(sensor)
        for s in ids[self._keys[ids] < 0].tolist():
            device, _ = self._registry.name_of(s)
            self._scored[s] = self._rule(s) is not None
            self._keys[s] = zlib.crc32(device.encode()) if self._scored[s] else s
        out: npt.NDArray[np.int64] = self._keys[sensor]
        return out

    def scored(self, sensor: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_]:
        """Which of these sensors belong to a device an asset rule matches."""
        self.part_keys(sensor)  # classifies the ones not seen yet
        out: npt.NDArray[np.bool_] = self._scored[sensor]
        return out

    async def settle(self, conn: asyncpg.Connection, new: Readings) -> AssetSettled | None:
        """In the flush's transaction, its new rows written: score their devices."""
        if not self._rules or not len(new):
            return None
        finite = np.isfinite(new.value)
        ids = np.unique(new.sensor[finite])
        ids = ids[self.scored(ids)]
        if not len(ids):
            return None
        locked = await db.lock(conn, ids)
        if not locked:
            return None
        stale = [
            r.device_id
            for r in locked
            if r.device_id not in self._models or self._models[r.device_id].version != r.model
        ]
        if stale:
            for model in await db.models(conn, stale):
                self._models[model.device_id] = model
        out = AssetSettled([], [], Upsert("", ()))
        updates = []
        models = [self._models[row.device_id] for row in locked]
        # Each reading of a model sensor to its device (j, in `locked`) and its index in that
        # device's model, in one pass: the readings grouped by device, in time order within each.
        ids = np.concatenate([m.sensor_ids for m in models])
        owner = np.concatenate([np.full(len(m.sensor_ids), j) for j, m in enumerate(models)])
        place = np.concatenate([np.arange(len(m.sensor_ids), dtype=np.int32) for m in models])
        by_id = np.argsort(ids)
        ids, owner, place = ids[by_id], owner[by_id], place[by_id]
        at = np.minimum(np.searchsorted(ids, new.sensor), len(ids) - 1)
        keep = finite & (ids[at] == new.sensor)
        device, index = owner[at[keep]], place[at[keep]]
        sensor, time, value = new.sensor[keep], new.time[keep], new.value[keep]
        order = np.lexsort((time, device))
        device, index, sensor = device[order], index[order], sensor[order]
        time, value = time[order], value[order]
        if not len(time):
            return None
        bounds = np.searchsorted(device, np.arange(len(models) + 1))
        plain: list[tuple[int, AssetRule]] = []  # devices whose readings all come after `last`
        starts = np.minimum(bounds[:-1], max(len(time) - 1, 0))
        first = zip(sensor[starts].tolist(), time[starts].tolist(), strict=True)
        for j, (row, model, (lo, hi), (sensor_id, oldest)) in enumerate(
            zip(locked, models, itertools.pairwise(bounds.tolist()), first, strict=True)
        ):
            if lo == hi:
                continue
            rule = self._rule(sensor_id)
            assert rule is not None
            if not rule.settle_s and (row.last is None or oldest > row.last):
                plain.append((j, rule))
                continue
            i, t, v = index[lo:hi], time[lo:hi], value[lo:hi]
            update = await self._device(conn, row, model, rule, i, t, v, out)
            if update is not None:
                updates.append(update)
        if plain:
            in_plain = np.zeros(len(models), np.bool_)
            in_plain[[j for j, _ in plain]] = True
            taken = in_plain[device]
            rows, events, timestamps = scoring.advance(
                [(locked[j], models[j], rule) for j, rule in plain],
                np.searchsorted(device[taken], [j for j, _ in plain] + [len(models)]),
                index[taken],
                time[taken],
                value[taken],
            )
            updates += rows
            out.events += events
            out.timestamps += timestamps
        if not updates:
            return None
        out.update = Upsert(UPDATE_SQL, (msgspec.json.encode(updates).decode(),))
        return out

    async def _device(
        self,
        conn: asyncpg.Connection,
        row: db.Locked,
        model: db.Model,
        rule: AssetRule,
        index: npt.NDArray[np.int32],
        time: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        out: AssetSettled,
    ) -> dict[str, object] | None:
        """Score one device's readings of the flush (each one's sensor index in its model, in
        time order) from its locked row, re-scoring or settling as its rule and row say."""
        ints, floats = scoring.state(row, model)
        oldest = int(time.min())
        newest = int(time.max())
        ev_i = np.empty((0, 3 + k.TOP), np.int64)
        ev_f = np.empty((0, 3 + k.TOP), np.float64)
        run = True
        if row.last is not None and oldest <= row.last:
            replayed = None
            if row.last - oldest <= self._max:  # else too far back: its reads unbounded
                replayed = await self._replay(conn, row, model, rule, oldest, newest, out)
            if replayed is not None:  # it ran the flush's readings too: they are stored
                ints, floats, ev_i, ev_f = replayed
                out.replays += 1
                run = False
            else:
                after = time > row.last
                out.late += int((~after).sum())
                index, time, value = index[after], time[after], value[after]
        if run and rule.settle_us and len(time):
            # the stored readings not scored yet, this flush's among them, up to settle_s
            # before the newest; at first, those after the model's baseline period
            since = row.last
            if since is None:
                since = max(model.fitted_to - 1, newest - self._max)
            index, time, value = await self._stored(conn, model, since, newest + self._max)
            index, time, value = scoring.settled(index, time, value, rule.settle_us)
        if run and len(time):
            times, _, ev_i, ev_f = model.model.run(
                index,
                time,
                value,
                hold_us=rule.hold_us,
                gap_us=rule.gap_us,
                min_us=rule.min_us,
                ints=ints,
                floats=floats,
            )
            out.timestamps += len(times)
        for i in range(len(ev_i)):
            out.events.append(scoring.event_of(model, ev_i[i], ev_f[i]))
        return scoring.state_row(row, model, ints.tolist(), floats.tolist())

    async def _stored(
        self, conn: asyncpg.Connection, model: db.Model, after: int, upto: int
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """The device's stored readings of its model sensors in (after, upto], in time order:
        each one's sensor index in the model, time and value."""
        stored = await db.readings(
            conn, sensor_ids=model.sensor_ids.tolist(), after=after, upto=upto
        )
        parts = [(np.full(len(t), j, np.int32), t, v) for j, (t, v) in enumerate(stored.values())]
        index = np.concatenate([p[0] for p in parts])
        times = np.concatenate([p[1] for p in parts])
        values = np.concatenate([p[2] for p in parts])
        order = np.argsort(times, kind="stable")
        return index[order], times[order], values[order]

    async def _replay(
        self,
        conn: asyncpg.Connection,
        row: db.Locked,
        model: db.Model,
        rule: AssetRule,
        oldest: int,
        newest: int,
        out: AssetSettled,
    ) -> (
        tuple[
            npt.NDArray[np.int64],
            npt.NDArray[np.float64],
            npt.NDArray[np.int64],
            npt.NDArray[np.float64],
        ]
        | None
    ):
        """Re-score the device from its latest quiet timestamp before `oldest`; None if there
        is none within reach."""
        assert row.last is not None
        reach = oldest - rule.replay_us
        upto = max(row.last, newest)
        if rule.settle_us:
            upto = newest + self._max  # readings held back by other flushes too
        index, times, values = await self._stored(conn, model, reach - rule.hold_us - 1, upto)
        if rule.settle_us:
            index, times, values = scoring.settled(index, times, values, rule.settle_us)
        ints, floats = k.fresh_state(len(model.sensor_ids))
        ts, scores, ev_i, ev_f = model.model.run(
            index,
            times,
            values,
            hold_us=rule.hold_us,
            gap_us=rule.gap_us,
            min_us=rule.min_us,
            ints=ints,
            floats=floats,
        )
        quiet = scoring.quiet_point(
            ts, scores, lo=reach + rule.gap_us, before=oldest, gap_us=rule.gap_us
        )
        if quiet is None:
            return None
        out.timestamps += int((ts > quiet).sum())
        later = ev_i[:, 0] > quiet
        out.deletes.append(
            Upsert(DELETE_EVENTS_SQL, ([model.anchor_id], [quiet], db.to_datetime(quiet)))
        )
        return ints, floats, ev_i[later], ev_f[later]
