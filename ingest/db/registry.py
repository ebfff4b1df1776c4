"""The registry stage: device and sensor names to integer ids, registered on first sight."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest.db.registration import insert_sensors, positions, select_sensors

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


Channel = tuple[str, str | None, int | None]
"""A new sensor of a device: its name, unit and latest reading time (µs), if any."""
Message = tuple[tuple[str, ...], Sequence[str], Sequence[str | None], Sequence[int | None]]
"""A message's channels: its device's topic levels, their names, units and latest times (µs)."""


class Registry:
    """Caches sensor ids; registers unknown sensors in the database. Called from one task only.

    Registration is safe with several ingesters registering the same new sensor at once: a
    conflicting insert is made again with `ON CONFLICT DO NOTHING`, and ids are then read back
    from the committed rows. A device gets at most `max_sensors_per_device` sensors; `resolve`
    refuses the names beyond.
    """

    def __init__(
        self, *, max_sensors_per_device: int = 10_000, last_seen_every_s: float = 60.0
    ) -> None:
        # Sensor ids by device (its topic levels), then name: a message's channels are looked
        # up in its device's table, and a new device's sensors added to one.
        self._sensors: dict[tuple[str, ...], dict[str, int]] = {}
        self._units: dict[int, str | None] = {}  # by sensor id
        self._levels: dict[int, tuple[str, ...]] = {}  # a sensor's device and name, by id
        self._names: dict[int, str] = {}  # (two tables: no tuple a sensor for the collector)
        self._devices: dict[str, int] = {}
        self._device_ids: dict[tuple[str, ...], int] = {}  # the same, by topic levels
        self._assets: set[str] = set()
        self._max_per_device = max_sensors_per_device
        self._last_seen_every_us = round(last_seen_every_s * 1e6)
        self._last_seen = np.full(1024, _NEVER, dtype=np.int64)  # by sensor id, µs
        self._shapes: dict[tuple[tuple[str, ...], tuple[str, ...]], _Shape] = {}
        self._units_version = 0
        self._used: set[int] = set()  # sensors named by a message since start

    def __len__(self) -> int:
        return len(self._units)

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
        names = self._sensors.get(key[0])
        return None if names is None else names.get(key[1])

    def name_of(self, sensor_id: int) -> tuple[str, str]:
        """(device path, sensor name) of a registered sensor id."""
        return "/".join(self._levels[sensor_id]), self._names[sensor_id]

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
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        self._grow(int(ids.max()) if len(ids) else 0)
        self._last_seen[ids] = np.fromiter((r[4] for r in rows), np.int64, len(rows))
        for sensor_id, device_id, name, unit, _ in rows:
            self._add(levels[device_id], name, sensor_id, unit)

    def _add(self, levels: tuple[str, ...], name: str, sensor_id: int, unit: str | None) -> None:
        names = self._sensors.get(levels)
        if names is None:
            self._sensors[levels] = names = {}
        names[name] = sensor_id
        self._units[sensor_id] = unit
        self._levels[sensor_id] = levels
        self._names[sensor_id] = name

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
        known = self._sensors[levels]
        ids = np.array([known[n] for n in names], dtype=np.int32)
        self._used.update(ids.tolist())
        if len(self._shapes) >= _MAX_SHAPES:
            self._shapes.clear()
        self._shapes[(levels, names)] = _Shape(ids, units, self._units_version)
        return ids

    # ------------------------------------------------------------------ registration

    def __contains__(self, key: SensorKey) -> bool:
        return self.get(key) is not None

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
        latest = latest or {}
        messages = [(k[0], (k[1],), (u,), (latest.get(k),)) for k, u in sensors.items()]
        return await self.resolve_messages(conn, messages=messages)

    async def resolve_messages(
        self, conn: asyncpg.Connection, *, messages: Iterable[Message]
    ) -> set[SensorKey]:
        """`resolve` for the channels of messages, in arrival order: a unit named later wins,
        and a new sensor's first last_seen is its latest reading time. No object is made a
        channel but for new sensors."""
        new: dict[tuple[str, ...], dict[str, Channel]] = {}
        named: dict[int, str] = {}  # the last unit each known sensor is given
        known, units, none = self._sensors, self._units, dict[str, int]()
        for levels, names, message_units, ends in messages:
            ids = known.get(levels, none)
            for name, unit, end in zip(names, message_units, ends, strict=True):
                sensor_id = ids.get(name)
                if sensor_id is not None:
                    if unit is not None:
                        named[sensor_id] = unit
                    continue
                channels = new.get(levels)
                if channels is None:
                    new[levels] = channels = {}
                was = channels.get(name)
                if was is not None:  # named by an earlier message too
                    unit = was[1] if unit is None else unit
                    end = was[2] if end is None else end if was[2] is None else max(was[2], end)
                channels[name] = (name, unit, end)
        fresh = {levels: list(channels.values()) for levels, channels in new.items()}
        changed = [(i, unit) for i, unit in named.items() if units[i] != unit]
        return await self._settle(conn, fresh, changed)

    async def _settle(
        self,
        conn: asyncpg.Connection,
        new: dict[tuple[str, ...], list[Channel]],
        changed: list[tuple[int, str]],
    ) -> set[SensorKey]:
        """Register the `new` sensors and write the `changed` units: the keys refused."""
        units = self._units
        refused: set[SensorKey] = set()
        if new:
            refused, others = await self._register(conn, new)
            # Sensors another ingester registered first carry the unit it gave them.
            changed += [(i, u) for i, u in others if u is not None and units[i] != u]
        if changed:
            await conn.execute(_UPDATE_UNITS, [c[0] for c in changed], [c[1] for c in changed])
            units.update(changed)
            self._units_version += 1
        return refused

    async def _register(
        self, conn: asyncpg.Connection, new: dict[tuple[str, ...], list[Channel]]
    ) -> tuple[set[SensorKey], list[tuple[int, str | None]]]:
        """Register the `new` sensors of each device: the keys refused (their device is full),
        and the ids of those another ingester registered first, with the units given here."""
        await self._register_devices(conn, [lv for lv in new if lv not in self._device_ids])
        allowed, refused = await self._within_cap(conn, new)
        if not allowed:
            return refused, []
        # Rows inserted in one order by every ingester, (device id, name), so that two
        # registering the same new sensors wait for each other instead of deadlocking.
        ids = self._device_ids
        device_ids: list[int] = []
        levels: list[tuple[str, ...]] = []
        names: list[str] = []
        units: list[str | None] = []
        times: list[int | None] = []
        for device_id, lv in sorted((ids[lv], lv) for lv in allowed):
            n, u, t = zip(*sorted(allowed[lv]), strict=True)  # names are unique in a device
            device_ids += [device_id] * len(n)
            levels += [lv] * len(n)
            names += n
            units += u
            times += t
        new_ids, at = await insert_sensors(
            conn, device_ids=device_ids, names=names, units=units, times=times
        )
        if new_ids:
            self._grow(max(new_ids))
        for sensor_id, i in zip(new_ids, at, strict=True):
            self._add(levels[i], names[i], sensor_id, units[i])
        self._last_seen[new_ids] = [_NEVER if (x := times[i]) is None else x for i in at]
        if len(new_ids) == len(names):
            return refused, []
        # Some were registered by another ingester first.
        rows = await select_sensors(conn, device_ids, names)
        self._grow(max(row["id"] for row in rows))
        mine = set(at)
        others = []
        found = positions(device_ids, names, [r[1] for r in rows], [r[2] for r in rows])
        for row, i in zip(rows, found, strict=True):
            if i not in mine:
                self._add(levels[i], names[i], row["id"], row["unit"])
                others.append((row["id"], units[i]))
        lost = [i for i in range(len(names)) if names[i] not in self._sensors[levels[i]]]
        if lost:
            path = "/".join(levels[lost[0]])
            raise RuntimeError(f"sensor {path}/{names[lost[0]]} was not registered")
        return refused, others

    async def _register_devices(
        self, conn: asyncpg.Connection, device_levels: Sequence[tuple[str, ...]]
    ) -> None:
        """Register new devices (and their assets), learning their ids."""
        if not device_levels:
            return
        devices = {"/".join(levels): levels for levels in device_levels}
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

    async def _within_cap(
        self, conn: asyncpg.Connection, new: dict[tuple[str, ...], list[Channel]]
    ) -> tuple[dict[tuple[str, ...], list[Channel]], set[SensorKey]]:
        """The new sensors each device still has room for (first come, first registered), and
        the keys of the rest. Counts what the database holds, so every ingester sees the
        others' sensors."""
        ids = self._device_ids
        device_ids = sorted(ids[lv] for lv in new)
        room = dict.fromkeys(device_ids, self._max_per_device)
        for row in await conn.fetch(_COUNT_SENSORS, device_ids):
            room[row["device_id"]] -= row["n"]
        if all(len(channels) <= room[ids[lv]] for lv, channels in new.items()):
            return new, set()
        # Some device is full: sensors it has already (another ingester registered them) take
        # no room; new ones are taken in arrival order while room lasts.
        pairs = [(ids[lv], c[0]) for lv, channels in new.items() for c in channels]
        rows = await select_sensors(conn, [p[0] for p in pairs], [p[1] for p in pairs])
        existing = {(row["device_id"], row["name"]) for row in rows}
        allowed: dict[tuple[str, ...], list[Channel]] = {}
        refused: set[SensorKey] = set()
        for lv, channels in new.items():
            device_id = ids[lv]
            for c in channels:
                if (device_id, c[0]) not in existing:
                    if room[device_id] <= 0:
                        refused.add(SensorKey(lv, c[0]))
                        continue
                    room[device_id] -= 1
                allowed.setdefault(lv, []).append(c)
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


@dataclass(frozen=True, slots=True)
class _Shape:
    ids: npt.NDArray[np.int32]
    units: tuple[str | None, ...]
    version: int
