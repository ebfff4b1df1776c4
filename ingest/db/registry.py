"""The registry stage: device and sensor names to integer ids, registered on first sight."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg
import msgspec
import numpy as np
import numpy.typing as npt

_INSERT_ASSETS = """
INSERT INTO telemetry.assets (path, parent_id, name, depth)
SELECT a.path, p.id, a.name, d.depth
  FROM unnest($1::text[], $2::text[], $3::text[]) AS a(path, name, parent_path)
  CROSS JOIN LATERAL (SELECT cardinality(string_to_array(a.path, '/'))::smallint) AS d(depth)
  LEFT JOIN telemetry.assets p ON p.path = a.parent_path
ON CONFLICT (path) DO NOTHING
"""
_INSERT_DEVICES = """
INSERT INTO telemetry.devices (path, name, asset_id)
SELECT d.path, d.name, a.id
  FROM unnest($1::text[], $2::text[], $3::text[]) AS d(path, name, asset_path)
  LEFT JOIN telemetry.assets a ON a.path = d.asset_path
ON CONFLICT (path) DO NOTHING
"""
_SELECT_DEVICES = "SELECT id, path FROM telemetry.devices WHERE path = ANY($1::text[])"
# How many sensors the devices have now, whoever registered them.
_COUNT_SENSORS = """
SELECT device_id, count(*) AS n FROM telemetry.sensors
 WHERE device_id = ANY($1::int[]) GROUP BY device_id
"""
# New sensors come back from the insert itself; only those another ingester registered first
# are read back afterwards.
# A new sensor's last_seen is its latest reading time in the flush that registers it, so that
# no UPDATE follows the first sight of a sensor. The columns come as one JSON document (see
# `_columns`): tens of thousands of sensors at a plant's first sight cost the client a few
# milliseconds that way, against several microseconds a sensor as four array parameters.
_INSERT_SENSORS = """
INSERT INTO telemetry.sensors (device_id, name, unit, last_seen)
SELECT k.device_id, k.name, k.unit,
       timestamptz 'epoch' + k.last_seen * interval '1 microsecond'
  FROM json_to_record($1::json) AS c(d int[], n text[], u text[], t int8[])
 CROSS JOIN LATERAL unnest(c.d, c.n, c.u, c.t) AS k(device_id, name, unit, last_seen)
ON CONFLICT (device_id, name) DO NOTHING
RETURNING id, device_id, name
"""
_SELECT_SENSORS = """
SELECT s.id, s.device_id, s.name, s.unit
  FROM telemetry.sensors s
  JOIN unnest($1::int[], $2::text[]) AS k(device_id, name)
    ON s.device_id = k.device_id AND s.name = k.name
"""
_UPDATE_UNITS = """
UPDATE telemetry.sensors s SET unit = u.unit
  FROM unnest($1::int[], $2::text[]) AS u(id, unit)
 WHERE s.id = u.id AND s.unit IS DISTINCT FROM u.unit
"""
# The whole registry in three statements, for a restart.
_LOAD_ASSETS = "SELECT path FROM telemetry.assets"
_LOAD_DEVICES = "SELECT id, path FROM telemetry.devices"
_LOAD_SENSORS = """
SELECT id, device_id, name, unit,
       coalesce((extract(epoch FROM last_seen) * 1000000)::int8, $1::int8) AS last_seen
  FROM telemetry.sensors
"""

_NEVER = np.iinfo(np.int64).min // 2  # a last-seen time before any reading
_MAX_SHAPES = 200_000  # message shapes remembered by `message_ids`


class SensorKey(NamedTuple):
    """A sensor as named on the wire: the device's topic levels and the sensor name.

    A tuple, since one is built and hashed for every channel of every message.
    """

    levels: tuple[str, ...]  # asset levels, then the device id
    name: str

    @property
    def device(self) -> str:
        return "/".join(self.levels)


@dataclass(slots=True)
class _Known:
    id: int
    unit: str | None
    key: SensorKey


class Registry:
    """Caches sensor ids; registers unknown sensors in the database. Called from one task only.

    Registration is safe with several ingesters registering the same new sensor at once: every
    insert is `ON CONFLICT DO NOTHING` and ids are then read back from the committed rows. A
    device gets at most `max_sensors_per_device` sensors; `resolve` refuses the names beyond.
    """

    def __init__(
        self, *, max_sensors_per_device: int = 10_000, last_seen_every_s: float = 60.0
    ) -> None:
        self._sensors: dict[SensorKey, _Known] = {}
        self._devices: dict[str, int] = {}
        self._device_ids: dict[tuple[str, ...], int] = {}  # the same, by topic levels
        self._assets: set[str] = set()
        self._by_id: dict[int, _Known] = {}
        self._max_per_device = max_sensors_per_device
        self._last_seen_every_us = round(last_seen_every_s * 1e6)
        self._last_seen = np.full(1024, _NEVER, dtype=np.int64)  # by sensor id, µs
        self._shapes: dict[tuple[tuple[str, ...], tuple[str, ...]], _Shape] = {}
        self._units_version = 0
        self._used: set[int] = set()  # sensors named by a message since start

    def __len__(self) -> int:
        return len(self._sensors)

    @property
    def used(self) -> int:
        """How many sensors the messages resolved since start named (the registry itself may
        know many more: it is loaded whole)."""
        return len(self._used)

    @property
    def units_version(self) -> int:
        """Changes whenever a sensor's unit does: ids kept with a message's units are good
        while it stays the same."""
        return self._units_version

    def get(self, key: SensorKey) -> int | None:
        known = self._sensors.get(key)
        return None if known is None else known.id

    def name_of(self, sensor_id: int) -> tuple[str, str]:
        """(device path, sensor name) of a registered sensor id."""
        key = self._by_id[sensor_id].key
        return key.device, key.name

    async def load(self, conn: asyncpg.Connection) -> None:
        """Read the whole registry (assets, devices, sensors, last-seen times) in bulk."""
        self._assets.update(r["path"] for r in await conn.fetch(_LOAD_ASSETS))
        paths: dict[int, str] = {}
        for row in await conn.fetch(_LOAD_DEVICES):
            self._devices[row["path"]] = row["id"]
            paths[row["id"]] = row["path"]
        levels = {device_id: tuple(path.split("/")) for device_id, path in paths.items()}
        self._device_ids.update((lv, device_id) for device_id, lv in levels.items())
        rows = await conn.fetch(_LOAD_SENSORS, _NEVER)
        ids = np.fromiter((r["id"] for r in rows), dtype=np.int64, count=len(rows))
        self._grow(int(ids.max()) if len(ids) else 0)
        self._last_seen[ids] = np.fromiter((r["last_seen"] for r in rows), np.int64, len(rows))
        for row in rows:
            self._add(SensorKey(levels[row["device_id"]], row["name"]), row["id"], row["unit"])

    def _add(self, key: SensorKey, sensor_id: int, unit: str | None) -> None:
        self._sensors[key] = self._by_id[sensor_id] = _Known(sensor_id, unit, key)

    def _grow(self, max_id: int) -> None:
        if max_id >= len(self._last_seen):
            grown = np.full(max(2 * len(self._last_seen), max_id + 1), _NEVER, dtype=np.int64)
            grown[: len(self._last_seen)] = self._last_seen
            self._last_seen = grown

    # ------------------------------------------------------------------ message shapes

    def message_ids(
        self, levels: tuple[str, ...], names: tuple[str, ...], units: tuple[str | None, ...]
    ) -> npt.NDArray[np.int32] | None:
        """The sensor ids of a message's channels, when a message of the same device, channel
        names and units was resolved before and no unit changed since; else None. Never awaits.
        """
        shape = self._shapes.get((levels, names))
        if shape is None or shape.units != units or shape.version != self._units_version:
            return None
        return shape.ids

    def remember(
        self, levels: tuple[str, ...], names: tuple[str, ...], units: tuple[str | None, ...]
    ) -> npt.NDArray[np.int32]:
        """The ids of a message's channels, all registered; kept for `message_ids`."""
        ids = np.array([self._sensors[SensorKey(levels, n)].id for n in names], dtype=np.int32)
        self._used.update(ids.tolist())
        if len(self._shapes) >= _MAX_SHAPES:
            self._shapes.clear()
        self._shapes[(levels, names)] = _Shape(ids, units, self._units_version)
        return ids

    # ------------------------------------------------------------------ registration

    def __contains__(self, key: SensorKey) -> bool:
        return key in self._sensors

    async def resolve(
        self,
        conn: asyncpg.Connection,
        *,
        sensors: Mapping[SensorKey, str | None],
        latest: Mapping[SensorKey, int] | None = None,
    ) -> set[SensorKey]:
        """Make every key of `sensors` (key -> unit) known, registering new ones and new units.
        `latest` holds the latest reading time (µs) of new keys: their first last_seen.

        Returns the new keys refused because their device has `max_sensors_per_device`.
        """
        missing: dict[SensorKey, str | None] = {}
        changed: list[tuple[int, str]] = []
        for k, u in sensors.items():
            known = self._sensors.get(k)
            if known is None:
                missing[k] = u
            elif u is not None and known.unit != u:
                changed.append((known.id, u))
        refused: set[SensorKey] = set()
        if missing:
            refused, others = await self._register(conn, missing, latest or {})
            # Sensors another ingester registered first carry the unit it gave them.
            for k in others:
                u, known = missing[k], self._sensors[k]
                if u is not None and known.unit != u:
                    changed.append((known.id, u))
        if changed:
            await conn.execute(_UPDATE_UNITS, [c[0] for c in changed], [c[1] for c in changed])
            for sensor_id, unit in changed:
                self._by_id[sensor_id].unit = unit
            self._units_version += 1
        return refused

    async def _register(
        self,
        conn: asyncpg.Connection,
        sensors: dict[SensorKey, str | None],
        latest: Mapping[SensorKey, int],
    ) -> tuple[set[SensorKey], list[SensorKey]]:
        """Register new `sensors`: the keys refused (their device is full), and those another
        ingester registered first."""
        new = {k.levels for k in sensors if k.levels not in self._device_ids}
        devices = {"/".join(levels): levels for levels in new}
        if devices:
            await self._register_assets(conn, devices.values())
            paths = sorted(devices)  # every ingester inserts in one order: no deadlock
            await conn.execute(
                _INSERT_DEVICES,
                paths,
                [devices[p][-1] for p in paths],
                ["/".join(devices[p][:-1]) or None for p in paths],
            )
            for row in await conn.fetch(_SELECT_DEVICES, paths):
                self._devices[row["path"]] = row["id"]
                self._device_ids[devices[row["path"]]] = row["id"]
        allowed, refused = await self._within_cap(conn, list(sensors))
        if not allowed:
            return refused, []
        # Rows inserted in one order by every ingester, so that two registering the same new
        # sensors wait for each other instead of deadlocking. Keys are unique: the sort never
        # compares them.
        ids = self._device_ids
        order = sorted([(ids[k.levels], k.name, k) for k in allowed])
        device_ids = [o[0] for o in order]
        names = [o[1] for o in order]
        keys = [o[2] for o in order]
        units = [sensors[k] for k in keys]
        times = [latest.get(k) for k in keys]
        columns = _columns(d=device_ids, n=names, u=units, t=times)
        inserted = await conn.fetch(_INSERT_SENSORS, columns)
        at = _positions(inserted, device_ids, names)
        if inserted:
            self._grow(max(row[0] for row in inserted))
        for row, i in zip(inserted, at, strict=True):
            self._add(keys[i], row[0], units[i])
        new_ids = np.fromiter((row[0] for row in inserted), np.int64, len(inserted))
        self._last_seen[new_ids] = [_NEVER if (t := times[i]) is None else t for i in at]
        if len(inserted) == len(keys):
            return refused, []
        # Some were registered by another ingester first.
        rows = await conn.fetch(_SELECT_SENSORS, device_ids, names)
        self._grow(max(row["id"] for row in rows))
        mine = set(at)
        others = []
        for row, i in zip(rows, _positions(rows, device_ids, names), strict=True):
            if i not in mine:
                self._add(keys[i], row["id"], row["unit"])
                others.append(keys[i])
        lost = [k for k in keys if k not in self._sensors]
        if lost:
            raise RuntimeError(f"sensor {lost[0].device}/{lost[0].name} was not registered")
        return refused, others

    async def _within_cap(
        self, conn: asyncpg.Connection, keys: Sequence[SensorKey]
    ) -> tuple[list[SensorKey], set[SensorKey]]:
        """The new keys each device still has room for (first come, first registered), and
        the rest. Counts what the database holds, so every ingester sees the others' sensors."""
        ids = self._device_ids
        device_ids = sorted({ids[k.levels] for k in keys})
        room = dict.fromkeys(device_ids, self._max_per_device)
        for row in await conn.fetch(_COUNT_SENSORS, device_ids):
            room[row["device_id"]] -= row["n"]
        wanted: dict[int, int] = {}
        for key in keys:
            d = ids[key.levels]
            wanted[d] = wanted.get(d, 0) + 1
        if all(wanted[d] <= room[d] for d in wanted):
            return list(keys), set()
        # Some device is full: sensors it has already (another ingester registered them) take
        # no room; new ones are taken in arrival order while room lasts.
        pairs = [(ids[k.levels], k.name) for k in keys]
        rows = await conn.fetch(_SELECT_SENSORS, [p[0] for p in pairs], [p[1] for p in pairs])
        existing = {(row["device_id"], row["name"]) for row in rows}
        allowed: list[SensorKey] = []
        refused: set[SensorKey] = set()
        for key, pair in zip(keys, pairs, strict=True):
            if pair in existing:
                allowed.append(key)
            elif room[pair[0]] > 0:
                room[pair[0]] -= 1
                allowed.append(key)
            else:
                refused.add(key)
        return allowed, refused

    async def _register_assets(
        self, conn: asyncpg.Connection, device_levels: Iterable[tuple[str, ...]]
    ) -> None:
        by_depth: dict[int, set[str]] = {}
        for levels in device_levels:
            for depth in range(1, len(levels)):
                path = "/".join(levels[:depth])
                if path not in self._assets:
                    by_depth.setdefault(depth, set()).add(path)
        for depth in sorted(by_depth):  # parents first, so children can find their parent's id
            paths = sorted(by_depth[depth])
            await conn.execute(
                _INSERT_ASSETS,
                paths,
                [p.rsplit("/", 1)[-1] for p in paths],
                [p.rsplit("/", 1)[0] if "/" in p else None for p in paths],
            )
            self._assets.update(paths)

    # ------------------------------------------------------------------ last seen

    def last_seen_due(
        self, sensor: npt.NDArray[np.int32], time: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """Which of these sensors (each once, with its latest new reading's time) need their
        `last_seen` written: none was written, or the one written is `last_seen_every_s` older.
        Never changes state.

        Keeps the registry's `last_seen` within a minute of the readings (in their own time)
        with at most one UPDATE per sensor per minute of readings, whatever the flush rate.
        """
        return time >= self._last_seen[sensor] + self._last_seen_every_us

    def last_seen_written(self, sensor: npt.NDArray[np.int32], time: npt.NDArray[np.int64]) -> None:
        """Record that the `last_seen` of these sensors (each once) was committed as `time`."""
        self._last_seen[sensor] = np.maximum(self._last_seen[sensor], time)


def _positions(
    rows: Sequence[asyncpg.Record], device_ids: Sequence[int], names: Sequence[str]
) -> list[int]:
    """The index in (`device_ids`, `names`) of each row's (device_id, name). An insert returns
    its rows in the order of its input, which is checked; any other order is looked up."""
    found: list[int] = []
    i, n = 0, len(names)
    for row in rows:
        device_id, name = row["device_id"], row["name"]
        while i < n and (device_ids[i] != device_id or names[i] != name):
            i += 1
        if i == n:
            index = {pair: j for j, pair in enumerate(zip(device_ids, names, strict=True))}
            return [index[(row["device_id"], row["name"])] for row in rows]
        found.append(i)
        i += 1
    return found


def _columns(**columns: Sequence[int | str | None]) -> str:
    """Equal-length columns as one JSON object of arrays, for `json_to_record` and `unnest`."""
    return _JSON.encode(columns).decode()


_JSON = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class _Shape:
    ids: npt.NDArray[np.int32]
    units: tuple[str | None, ...]
    version: int
