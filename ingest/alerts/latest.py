"""The newest stored reading of each sensor, as alerts read it for silence and for how far a
condition's sensors have been judged."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

# The newest reading of each sensor. A sensor's last_seen never passes its newest reading, so
# the read starts there, and at the oldest last_seen as a plain parameter, so that TimescaleDB
# plans only the chunks from there on, however many the table holds. A sensor it misses (no
# last_seen yet, or one ahead of what is stored) is looked up without the bound.
_FLOOR = "SELECT min(last_seen) FROM telemetry.sensors WHERE id = ANY($1::int[])"
_LATEST = """
SELECT s.id, x.t
  FROM telemetry.sensors s
  CROSS JOIN LATERAL (SELECT r.time AS t FROM telemetry.readings r
                       WHERE r.sensor_id = s.id AND r.time >= s.last_seen AND r.time >= $2
                       ORDER BY r.time DESC LIMIT 1) AS x
 WHERE s.id = ANY($1::int[])
"""
_LATEST_UNBOUNDED = """
SELECT s.id, x.t
  FROM unnest($1::int[]) AS s(id)
  CROSS JOIN LATERAL (SELECT r.time AS t FROM telemetry.readings r
                       WHERE r.sensor_id = s.id ORDER BY r.time DESC LIMIT 1) AS x
"""


async def newest_readings(
    conn: asyncpg.Connection, sensor_ids: Sequence[int]
) -> dict[int, datetime]:
    """The time of each sensor's newest stored reading; sensors without one are left out."""
    out: dict[int, datetime] = {}
    floor = await conn.fetchval(_FLOOR, sensor_ids)
    if floor is not None:
        out = {r["id"]: r["t"] for r in await conn.fetch(_LATEST, sensor_ids, floor)}
    missed = [s for s in sensor_ids if s not in out]
    if missed:
        out.update({r["id"]: r["t"] for r in await conn.fetch(_LATEST_UNBOUNDED, missed)})
    return out
