"""Asset health in the database (schema/010): the models `ingest baseline` writes, the scoring
state rows a flush locks, and the bounded reads a re-scoring makes.

Times travel as int64 microseconds since the Unix epoch. Nothing here opens a transaction
except `store_model`: `lock` belongs in the flush's, and the reads after it see what committed
before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest.asset.model import AssetModel
from ingest.db.anomaly_state import to_datetime

__all__ = [
    "DELETE_EVENTS_SQL",
    "UPDATE_SQL",
    "Locked",
    "Model",
    "lock",
    "models",
    "readings",
    "store_model",
    "to_datetime",
]

_TS = "(timestamptz 'epoch' + {} * interval '1 microsecond')"
_US = "(extract(epoch FROM {}) * 1000000)::int8"
_FINITE = "value NOT IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8)"

# The state rows of the devices of these sensors that have a model, locked in device id order
# (after the per-sensor rows, which a flush locks first), with their model's version.
_LOCK = f"""
SELECT s.device_id, s.version, s.model_version, {_US.format("s.last_time")} AS last,
       s.sensor_ids AS state_sensors, s.ints, s.floats, m.version AS model
  FROM telemetry.asset_state s JOIN telemetry.asset_models m ON m.device_id = s.device_id
 WHERE s.device_id IN (SELECT device_id FROM telemetry.sensors WHERE id = ANY($1::int[]))
 ORDER BY s.device_id FOR UPDATE OF s
"""
_MODELS = f"""
SELECT device_id, version, anchor_id, sensor_ids, sensors, mean, scale, components, loadings,
       eigenvalues, t2_limit, q_limit, samples, quantile, margin,
       {_US.format("fitted_to")} AS fitted_to
  FROM telemetry.asset_models WHERE device_id = ANY($1::int[])
"""
# Per sensor: its finite readings in (after, upto], as arrays.
_READINGS = f"""
SELECT k.sensor_id, array_agg({_US.format("r.time")} ORDER BY r.time) AS t,
       array_agg(r.value ORDER BY r.time) AS v
  FROM unnest($1::int[]) AS k(sensor_id)
  JOIN telemetry.readings r
    ON r.sensor_id = k.sensor_id AND r.time > $2 AND r.time <= $3 AND r.{_FINITE}
 GROUP BY k.sensor_id
"""

DELETE_EVENTS_SQL = f"""
DELETE FROM telemetry.anomalies a
 USING unnest($1::int[], $2::int8[]) AS d(anchor_id, after)
 WHERE a.sensor_id = d.anchor_id AND a.kind = 'asset'
   AND a.start_time > {_TS.format("d.after")} AND a.start_time > $3
"""
"""Deletes the asset events of a re-scored span: per (anchor, after), those starting after it."""

UPDATE_SQL = f"""
UPDATE telemetry.asset_state s
   SET version = s.version + 1, model_version = u.model,
       last_time = {_TS.format("u.last")}, sensor_ids = u.sensors, ints = u.ints, floats = u.floats
  FROM (SELECT * FROM jsonb_to_recordset($1::jsonb)
          AS x(device_id int, model int8, last int8, sensors int[], ints int8[], floats float8[])
       ) AS u
 WHERE s.device_id = u.device_id
"""
"""A flush's new scoring states, one JSON object per device, under the lock `lock` took."""

_STORE = """
INSERT INTO telemetry.asset_models AS m (device_id, anchor_id, sensor_ids, sensors, mean, scale,
    components, loadings, eigenvalues, t2_limit, q_limit, fitted_from, fitted_to, samples,
    quantile, margin)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)
ON CONFLICT (device_id) DO UPDATE SET
    version = m.version + 1, anchor_id = EXCLUDED.anchor_id, sensor_ids = EXCLUDED.sensor_ids,
    sensors = EXCLUDED.sensors, mean = EXCLUDED.mean, scale = EXCLUDED.scale,
    components = EXCLUDED.components, loadings = EXCLUDED.loadings,
    eigenvalues = EXCLUDED.eigenvalues, t2_limit = EXCLUDED.t2_limit,
    q_limit = EXCLUDED.q_limit, fitted_from = EXCLUDED.fitted_from,
    fitted_to = EXCLUDED.fitted_to, samples = EXCLUDED.samples, quantile = EXCLUDED.quantile,
    margin = EXCLUDED.margin, fitted_at = now()
RETURNING version
"""
_ANCHOR = """
INSERT INTO telemetry.sensors (device_id, name) VALUES ($1, $2)
ON CONFLICT (device_id, name) DO UPDATE SET name = EXCLUDED.name
RETURNING id
"""
_STATE_ROW = """
INSERT INTO telemetry.asset_state (device_id) VALUES ($1) ON CONFLICT (device_id) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class Model:
    """A device's model as the ingester scores with it."""

    device_id: int
    version: int
    anchor_id: int
    sensor_ids: npt.NDArray[np.int32]  # ascending
    model: AssetModel
    fitted_to: int  # the end of its baseline period (exclusive), microseconds


@dataclass(frozen=True, slots=True)
class Locked:
    """One locked state row. `last` is None before the device's first scored timestamp."""

    device_id: int
    version: int
    model_version: int
    model: int
    last: int | None
    sensors: npt.NDArray[np.int32]
    ints: npt.NDArray[np.int64]
    floats: npt.NDArray[np.float64]


async def lock(conn: asyncpg.Connection, sensor_ids: npt.NDArray[np.int32]) -> list[Locked]:
    """Lock the state rows of the devices of these sensors that have a model (device order)."""
    rows = await conn.fetch(_LOCK, sensor_ids.tolist())
    return [
        Locked(
            device_id=r["device_id"],
            version=r["version"],
            model_version=r["model_version"],
            model=r["model"],
            last=r["last"],
            sensors=np.array(r["state_sensors"], np.int32),
            ints=np.array(r["ints"], np.int64),
            floats=np.array(r["floats"], np.float64),
        )
        for r in rows
    ]


async def models(conn: asyncpg.Connection, device_ids: Sequence[int]) -> list[Model]:
    """The current models of these devices."""
    out = []
    for r in await conn.fetch(_MODELS, list(device_ids)):
        d, k = len(r["sensor_ids"]), r["components"]
        model = AssetModel(
            sensors=tuple(r["sensors"]),
            mean=np.array(r["mean"], np.float64),
            scale=np.array(r["scale"], np.float64),
            loadings=np.array(r["loadings"], np.float64).reshape(d, k),
            eigenvalues=np.array(r["eigenvalues"], np.float64),
            t2_limit=r["t2_limit"],
            q_limit=r["q_limit"],
            samples=r["samples"],
            quantile=r["quantile"],
            margin=r["margin"],
        )
        ids = np.array(r["sensor_ids"], np.int32)
        out.append(Model(r["device_id"], r["version"], r["anchor_id"], ids, model, r["fitted_to"]))
    return out


async def readings(
    conn: asyncpg.Connection, *, sensor_ids: Sequence[int], after: int, upto: int
) -> dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """Per sensor, its finite readings in (after, upto], oldest first."""
    empty = (np.empty(0, np.int64), np.empty(0, np.float64))
    out = dict.fromkeys(sensor_ids, empty)
    if not sensor_ids:
        return out
    rows = await conn.fetch(_READINGS, list(sensor_ids), to_datetime(after), to_datetime(upto))
    for r in rows:
        out[r["sensor_id"]] = (np.array(r["t"], np.int64), np.array(r["v"], np.float64))
    return out


async def store_model(
    conn: asyncpg.Connection,
    *,
    device_id: int,
    anchor: str,
    sensor_ids: Sequence[int],
    model: AssetModel,
    fitted_from: int,
    fitted_to: int,
) -> int:
    """Write a device's model (a new version if it had one), its anchor sensor and its state
    row, in one transaction; returns the model's version."""
    async with conn.transaction():
        anchor_id = await conn.fetchval(_ANCHOR, device_id, anchor)
        version: int = await conn.fetchval(
            _STORE,
            device_id,
            anchor_id,
            list(sensor_ids),
            list(model.sensors),
            model.mean.tolist(),
            model.scale.tolist(),
            model.components,
            model.loadings.ravel().tolist(),
            model.eigenvalues.tolist(),
            model.t2_limit,
            model.q_limit,
            to_datetime(fitted_from),
            to_datetime(fitted_to),
            model.samples,
            model.quantile,
            model.margin,
        )
        await conn.execute(_STATE_ROW, device_id)
    return version
