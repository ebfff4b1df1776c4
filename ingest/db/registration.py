"""New sensors into the registry's table: tens of thousands in one statement, safe with
several ingesters registering the same sensors at once (see `Registry`)."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
import msgspec

__all__ = ["insert_sensors", "positions", "select_sensors"]

# A new sensor's last_seen is its latest reading time in the flush that registers it, so that
# no UPDATE follows the first sight of a sensor. The columns come as one JSON document, and
# the rows inserted go back as three arrays: tens of thousands of sensors at a plant's first
# sight cost the client a few milliseconds that way, against several microseconds a sensor
# as array parameters and a record a row.
_INSERT = """
WITH inserted AS (
INSERT INTO telemetry.sensors (device_id, name, unit, last_seen)
SELECT k.device_id, k.name, k.unit,
       timestamptz 'epoch' + k.last_seen * interval '1 microsecond'
  FROM json_to_record($1::json) AS c(d int[], n text[], u text[], t int8[])
 CROSS JOIN LATERAL unnest(c.d, c.n, c.u, c.t) AS k(device_id, name, unit, last_seen)
{}
RETURNING id, device_id, name
)
SELECT coalesce(array_agg(id), '{{}}'), coalesce(array_agg(device_id), '{{}}'),
       coalesce(array_agg(name), '{{}}')
  FROM inserted
"""
# A plain insert first: ON CONFLICT's speculative insertion (a look-up in the unique index
# before each row, a confirmation after) cost about a third of the statement's time. Should
# another ingester have registered one of the sensors, the insert fails whole and is made
# again skipping the sensors that exist.
_INSERT_NEW = _INSERT.format("")
_INSERT_OR_SKIP = _INSERT.format("ON CONFLICT (device_id, name) DO NOTHING")
_SELECT = """
SELECT s.id, s.device_id, s.name, s.unit
  FROM telemetry.sensors s
  JOIN unnest($1::int[], $2::text[]) AS k(device_id, name)
    ON s.device_id = k.device_id AND s.name = k.name
"""
_JSON = msgspec.json.Encoder()


async def insert_sensors(
    conn: asyncpg.Connection,
    *,
    device_ids: list[int],
    names: list[str],
    units: Sequence[str | None],
    times: Sequence[int | None],
) -> tuple[list[int], Sequence[int]]:
    """Insert the sensors not registered yet, given in (device id, name) order by every
    ingester, so that two inserting the same new sensors wait for each other instead of
    deadlocking: the ids of those inserted, and their indices in the columns given."""
    columns = _JSON.encode({"d": device_ids, "n": names, "u": units, "t": times}).decode()
    try:
        if not conn.is_in_transaction():
            row = await conn.fetchrow(_INSERT_NEW, columns)
        else:
            async with conn.transaction():  # a savepoint: a failed insert is undone alone
                row = await conn.fetchrow(_INSERT_NEW, columns)
    except asyncpg.UniqueViolationError:
        row = await conn.fetchrow(_INSERT_OR_SKIP, columns)
    assert row is not None
    ids, got_devices, got_names = row
    return ids, positions(device_ids, names, got_devices, got_names)


async def select_sensors(
    conn: asyncpg.Connection, device_ids: Sequence[int], names: Sequence[str]
) -> list[asyncpg.Record]:
    """The registered sensors among these (id, device_id, name, unit)."""
    return await conn.fetch(_SELECT, device_ids, names)


def positions(
    device_ids: Sequence[int], names: Sequence[str], got_devices: list[int], got_names: list[str]
) -> Sequence[int]:
    """The index in (`device_ids`, `names`) of each (device id, name) got back. An insert
    returns its rows in the order of its input, which is checked; any other order is looked
    up."""
    if got_names == names and got_devices == device_ids:
        return range(len(names))
    found: list[int] = []
    i, n = 0, len(names)
    for device_id, name in zip(got_devices, got_names, strict=True):
        while i < n and (device_ids[i] != device_id or names[i] != name):
            i += 1
        if i == n:
            index = {pair: j for j, pair in enumerate(zip(device_ids, names, strict=True))}
            return [index[pair] for pair in zip(got_devices, got_names, strict=True)]
        found.append(i)
        i += 1
    return found
