"""The registry stage: device and sensor names to integer ids, registered on first sight."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import asyncpg

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
_INSERT_SENSORS = """
INSERT INTO telemetry.sensors (device_id, name, unit)
SELECT * FROM unnest($1::int[], $2::text[], $3::text[])
ON CONFLICT (device_id, name) DO NOTHING
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


class Registry:
    """Caches sensor ids; registers unknown sensors in the database. Called from one task only.

    Registration is safe with several ingesters registering the same new sensor at once: every
    insert is `ON CONFLICT DO NOTHING` and ids are then read back from the committed rows.
    """

    def __init__(self, *, last_seen_every_s: float = 60.0) -> None:
        self._sensors: dict[SensorKey, _Known] = {}
        self._devices: dict[str, int] = {}
        self._assets: set[str] = set()
        self._names: dict[int, tuple[str, str]] = {}
        self._by_id: dict[int, _Known] = {}
        self._last_seen_written: dict[int, float] = {}
        self._last_seen_every = last_seen_every_s

    def __len__(self) -> int:
        return len(self._sensors)

    def get(self, key: SensorKey) -> int | None:
        known = self._sensors.get(key)
        return None if known is None else known.id

    def name_of(self, sensor_id: int) -> tuple[str, str]:
        """(device path, sensor name) of a registered sensor id."""
        return self._names[sensor_id]

    async def resolve(
        self, conn: asyncpg.Connection, *, sensors: dict[SensorKey, str | None]
    ) -> None:
        """Make every key of `sensors` (key -> unit) known, registering new ones and new units."""
        missing = {k: u for k, u in sensors.items() if k not in self._sensors}
        changed = [
            (self._sensors[k].id, u)
            for k, u in sensors.items()
            if u is not None and k in self._sensors and self._sensors[k].unit != u
        ]
        if missing:
            await self._register(conn, missing)
        if changed:
            await conn.execute(_UPDATE_UNITS, [c[0] for c in changed], [c[1] for c in changed])
            for sensor_id, unit in changed:
                self._by_id[sensor_id].unit = unit

    async def _register(
        self, conn: asyncpg.Connection, sensors: dict[SensorKey, str | None]
    ) -> None:
        devices = {k.device: k.levels for k in sensors if k.device not in self._devices}
        if devices:
            await self._register_assets(conn, devices.values())
            paths = list(devices)
            await conn.execute(
                _INSERT_DEVICES,
                paths,
                [devices[p][-1] for p in paths],
                ["/".join(devices[p][:-1]) or None for p in paths],
            )
            for row in await conn.fetch(_SELECT_DEVICES, paths):
                self._devices[row["path"]] = row["id"]
        keys = list(sensors)
        device_ids = [self._devices[k.device] for k in keys]
        names = [k.name for k in keys]
        await conn.execute(_INSERT_SENSORS, device_ids, names, [sensors[k] for k in keys])
        by_pair = {(self._devices[k.device], k.name): k for k in keys}
        for row in await conn.fetch(_SELECT_SENSORS, device_ids, names):
            key = by_pair[(row["device_id"], row["name"])]
            known = _Known(row["id"], row["unit"])
            self._sensors[key] = self._by_id[known.id] = known
            self._names[known.id] = (key.device, key.name)
        lost = [k for k in keys if k not in self._sensors]
        if lost:
            raise RuntimeError(f"sensor {lost[0].device}/{lost[0].name} was not registered")
        # A unit first sent after another ingester registered the sensor without one.
        await self.resolve(conn, sensors={k: u for k, u in sensors.items() if u is not None})

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

    def last_seen_due(self, sensor_ids: Iterable[int], *, now: float) -> list[int]:
        """Sensors whose `last_seen` was not written in the last minute. Never changes state.

        Keeps the registry's `last_seen` within a minute of the truth without an UPDATE per
        sensor per flush; `last_seen_written` records a committed write.
        """
        written = self._last_seen_written
        return [s for s in sensor_ids if now - written.get(s, -1e18) >= self._last_seen_every]

    def last_seen_written(self, sensor_ids: Iterable[int], *, now: float) -> None:
        """Record that the `last_seen` of these sensors was committed at `now`."""
        for s in sensor_ids:
            self._last_seen_written[s] = now
