"""Sparkplug edge nodes' births as the database keeps them, and this instance's cache of them.

`sparkplug_nodes` holds each node's `birth_id` (new at every birth) and bdSeq,
`sparkplug_metrics` the metrics of its last NBIRTH and DBIRTHs. An instance reloads a node
when the database's `birth_id` is not the one its cache was built from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np

from ingest.db.sink import Upsert
from ingest.sparkplug.aliases import AliasTable

__all__ = ["BirthMetric", "NodeState", "births_upserts", "load_changed"]

_SELECT_NODES = "SELECT node, birth_id, bd_seq FROM telemetry.sparkplug_nodes WHERE node = ANY($1)"
_SELECT_METRICS = (
    "SELECT node, device, name, alias, sensor_id, datatype FROM telemetry.sparkplug_metrics"
    " WHERE node = ANY($1)"
)
_UPSERT_NODES = """
INSERT INTO telemetry.sparkplug_nodes (node, birth_id, bd_seq)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
ON CONFLICT (node) DO UPDATE
   SET birth_id = EXCLUDED.birth_id, bd_seq = EXCLUDED.bd_seq, born_at = now()
"""
_DELETE_METRICS = "DELETE FROM telemetry.sparkplug_metrics WHERE node = ANY($1::text[])"
_INSERT_METRICS = """
INSERT INTO telemetry.sparkplug_metrics (node, device, name, alias, sensor_id, datatype)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::int[], $6::smallint[])
ON CONFLICT (node, device, name) DO UPDATE
   SET alias = EXCLUDED.alias, sensor_id = EXCLUDED.sensor_id, datatype = EXCLUDED.datatype
"""


@dataclass(frozen=True, slots=True)
class BirthMetric:
    """One metric of a birth, as kept for aliases and deaths."""

    name: str
    alias: int | None  # signed view of the alias's 64 bits
    sensor: int | None  # None: not stored (not numeric)
    datatype: int


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the last births of an edge node defined (immutable: a birth makes a new one)."""

    birth_id: int
    bd_seq: int | None
    devices: dict[str, tuple[BirthMetric, ...]]  # '' for the node's own metrics
    table: AliasTable
    names: dict[int, str]  # alias -> name, for template instances sent by alias in DATA

    @classmethod
    def of(
        cls, birth_id: int, bd_seq: int | None, devices: dict[str, tuple[BirthMetric, ...]]
    ) -> NodeState:
        metrics = [m for ms in devices.values() for m in ms if m.alias is not None]
        table = AliasTable.build(
            aliases=np.array([m.alias for m in metrics], np.int64),
            sensors=np.array([-1 if m.sensor is None else m.sensor for m in metrics], np.int32),
            datatypes=np.array([m.datatype for m in metrics], np.int64),
        )
        names = {m.alias: m.name for m in metrics if m.alias is not None}
        return cls(birth_id, bd_seq, devices, table, names)


async def load_changed(
    conn: asyncpg.Connection, nodes: Sequence[str], cached: Mapping[str, NodeState]
) -> dict[str, NodeState]:
    """The nodes among `nodes` whose birth in the database is not the cached one: one query,
    and one more only when some changed."""
    stale: dict[str, tuple[int, int | None]] = {}
    for row in await conn.fetch(_SELECT_NODES, list(nodes)):
        old = cached.get(row["node"])
        if old is None or old.birth_id != row["birth_id"]:
            stale[row["node"]] = (row["birth_id"], row["bd_seq"])
    if not stale:
        return {}
    devices: dict[str, dict[str, list[BirthMetric]]] = {n: {} for n in stale}
    for row in await conn.fetch(_SELECT_METRICS, list(stale)):
        devices[row["node"]].setdefault(row["device"], []).append(
            BirthMetric(row["name"], row["alias"], row["sensor_id"], row["datatype"])
        )
    return {
        node: NodeState.of(birth_id, bd_seq, {d: tuple(ms) for d, ms in devices[node].items()})
        for node, (birth_id, bd_seq) in stale.items()
    }


def births_upserts(states: Mapping[str, NodeState]) -> list[Upsert]:
    """The writes that make the database hold `states` (node -> its births), in node order."""
    nodes = sorted(states)
    unique: dict[tuple[str, str, str], BirthMetric] = {}  # a name given twice: the last wins
    for node in nodes:
        for device, metrics in sorted(states[node].devices.items()):
            for m in metrics:
                unique[(node, device, m.name)] = m
    cols: tuple[list[object], ...] = ([], [], [], [], [], [])
    for (node, device, name), m in unique.items():
        for col, v in zip(cols, (node, device, name, m.alias, m.sensor, m.datatype), strict=True):
            col.append(v)
    return [
        Upsert(
            _UPSERT_NODES,
            (nodes, [states[n].birth_id for n in nodes], [states[n].bd_seq for n in nodes]),
        ),
        Upsert(_DELETE_METRICS, (nodes,)),
        Upsert(_INSERT_METRICS, cols),
    ]
