"""Sparkplug edge nodes' births and deaths as the database keeps them, and this instance's cache.

`sparkplug_nodes` holds each node's version (`birth_id`, new at every birth and death) and
bdSeq, `sparkplug_metrics` the metrics of its last NBIRTH and DBIRTHs, `sparkplug_devices`
when the node and each device was born and whether it is online. An instance reloads a node
when the database's version is not the one its cache was built from; a flush that changes a
node checks, in its transaction, that the node is still at the version the flush read.

The changes (`nbirth`, `dbirth`, `ndeath`, `ddeath`) are pure: each takes a node's state and
returns the next one, or None when the message changes nothing. Births are ordered by their
timestamps, so that two ingesters committing an NBIRTH and the DBIRTH after it in either order
end with the same state: an NBIRTH keeps the devices born at or after it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import asyncpg
import numpy as np

from ingest.db.sink import Upsert
from ingest.sparkplug.aliases import AliasTable

__all__ = [
    "BirthMetric",
    "Life",
    "NodeState",
    "dbirth",
    "ddeath",
    "load",
    "nbirth",
    "ndeath",
    "state_upserts",
]

_SELECT_NODES = "SELECT node, birth_id, bd_seq FROM telemetry.sparkplug_nodes WHERE node = ANY($1)"
_SELECT_METRICS = (
    "SELECT node, device, name, alias, sensor_id, datatype FROM telemetry.sparkplug_metrics"
    " WHERE node = ANY($1)"
)
_SELECT_DEVICES = (
    "SELECT node, device, born_ms, online FROM telemetry.sparkplug_devices WHERE node = ANY($1)"
)
_CHECK = "SELECT telemetry.sparkplug_check($1::text[], $2::bigint[])"
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
_DELETE_DEVICES = "DELETE FROM telemetry.sparkplug_devices WHERE node = ANY($1::text[])"
_INSERT_DEVICES = """
INSERT INTO telemetry.sparkplug_devices (node, device, born_ms, online)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::boolean[])
"""


@dataclass(frozen=True, slots=True)
class BirthMetric:
    """One metric of a birth, as kept for aliases and deaths."""

    name: str
    alias: int | None  # signed view of the alias's 64 bits
    sensor: int | None  # None: not stored (not numeric)
    datatype: int


@dataclass(frozen=True, slots=True)
class Life:
    """The last birth of an edge node ('') or device: its timestamp, and whether no death
    followed it."""

    born_ms: int | None
    online: bool


@dataclass(frozen=True, slots=True)
class NodeState:
    """What the last births and deaths of an edge node left (immutable: a change makes a new
    one, with a new `birth_id`)."""

    birth_id: int
    bd_seq: int | None
    devices: dict[str, tuple[BirthMetric, ...]]  # '' for the node's own metrics
    lives: dict[str, Life]  # '' for the node; a device is online only while its node is
    table: AliasTable
    names: dict[int, str]  # alias -> name, for template instances sent by alias in DATA

    @classmethod
    def of(
        cls,
        birth_id: int,
        bd_seq: int | None,
        devices: dict[str, tuple[BirthMetric, ...]],
        lives: dict[str, Life],
    ) -> NodeState:
        metrics = [m for ms in devices.values() for m in ms if m.alias is not None]
        table = AliasTable.build(
            aliases=np.array([m.alias for m in metrics], np.int64),
            sensors=np.array([-1 if m.sensor is None else m.sensor for m in metrics], np.int32),
            datatypes=np.array([m.datatype for m in metrics], np.int64),
        )
        names = {m.alias: m.name for m in metrics if m.alias is not None}
        return cls(birth_id, bd_seq, devices, lives, table, names)

    def online(self, device: str) -> bool:
        """Whether the edge node ('') or one of its devices is online."""
        life = self.lives.get(device)
        node = self.lives.get("")
        return life is not None and life.online and (node is None or node.online)

    def sensors(self, devices: Sequence[str]) -> list[int]:
        """The stored sensors of the last births of `devices` ('' for the node's own)."""
        return sorted(
            {m.sensor for d in devices for m in self.devices.get(d, ()) if m.sensor is not None}
        )


def _before(ms: int | None, other: int | None) -> bool:
    """Whether a birth at `ms` is older than one at `other` (unknown times are not)."""
    return ms is not None and other is not None and ms < other


def nbirth(
    old: NodeState | None, metrics: tuple[BirthMetric, ...], *, bd_seq: int | None, ms: int | None
) -> NodeState | None:
    """After an NBIRTH at `ms`: the node's metrics replaced, its devices dropped but those born
    at or after it. None for an NBIRTH older than the node's last one."""
    node = old.lives.get("") if old is not None else None
    if node is not None and _before(ms, node.born_ms):
        return None
    devices = {"": metrics}
    lives = {"": Life(ms, True)}
    if old is not None:
        for device, life in old.lives.items():
            if device and ms is not None and life.born_ms is not None and life.born_ms >= ms:
                devices[device] = old.devices.get(device, ())
                lives[device] = life
    return NodeState.of(secrets.randbits(63), bd_seq, devices, lives)


def dbirth(
    old: NodeState | None, device: str, metrics: tuple[BirthMetric, ...], *, ms: int | None
) -> NodeState | None:
    """After a DBIRTH at `ms`: the device's metrics replaced and the device online. None for
    one older than the node's last NBIRTH or the device's last DBIRTH."""
    devices = dict(old.devices) if old is not None else {}
    lives = dict(old.lives) if old is not None else {}
    for born in (lives.get(""), lives.get(device)):
        if born is not None and _before(ms, born.born_ms):
            return None
    devices[device] = metrics
    lives[device] = Life(ms, True)
    bd_seq = old.bd_seq if old is not None else None
    return NodeState.of(secrets.randbits(63), bd_seq, devices, lives)


def ndeath(old: NodeState, bd_seq: int | None) -> tuple[NodeState, list[int]] | None:
    """After an NDEATH: the node and its devices offline, and the sensors to mark stale (the
    node's and those of its devices that were online). None unless `bd_seq` is the last
    NBIRTH's and the node is online."""
    if bd_seq is None or bd_seq != old.bd_seq or not old.online(""):
        return None
    stale = old.sensors([d for d in old.devices if old.online(d)])
    lives = {d: Life(life.born_ms, False) for d, life in old.lives.items()}
    return NodeState.of(secrets.randbits(63), old.bd_seq, dict(old.devices), lives), stale


def ddeath(old: NodeState, device: str, *, ms: int | None) -> tuple[NodeState, list[int]] | None:
    """After a DDEATH at `ms`: the device offline, and its sensors to mark stale. None unless
    the device is online and was born no later than `ms`."""
    life = old.lives.get(device)
    if not device or life is None or not old.online(device) or _before(ms, life.born_ms):
        return None
    lives = dict(old.lives)
    lives[device] = Life(life.born_ms, False)
    state = NodeState.of(secrets.randbits(63), old.bd_seq, dict(old.devices), lives)
    return state, old.sensors([device])


async def load(
    conn: asyncpg.Connection, nodes: Sequence[str], cached: Mapping[str, NodeState]
) -> tuple[dict[str, int], dict[str, NodeState]]:
    """The version of each of `nodes` the database has (absent: not there), and the state of
    those whose version is not the cached one: one query, and two more only when some changed."""
    versions: dict[str, int] = {}
    stale: dict[str, int | None] = {}
    for row in await conn.fetch(_SELECT_NODES, list(nodes)):
        node, version = row["node"], row["birth_id"]
        versions[node] = version
        old = cached.get(node)
        if old is None or old.birth_id != version:
            stale[node] = row["bd_seq"]
    if not stale:
        return versions, {}
    devices: dict[str, dict[str, list[BirthMetric]]] = {n: {} for n in stale}
    for row in await conn.fetch(_SELECT_METRICS, list(stale)):
        devices[row["node"]].setdefault(row["device"], []).append(
            BirthMetric(row["name"], row["alias"], row["sensor_id"], row["datatype"])
        )
    lives: dict[str, dict[str, Life]] = {n: {} for n in stale}
    for row in await conn.fetch(_SELECT_DEVICES, list(stale)):
        lives[row["node"]][row["device"]] = Life(row["born_ms"], row["online"])
    return versions, {
        node: NodeState.of(
            versions[node],
            bd_seq,
            {d: tuple(ms) for d, ms in devices[node].items()},
            lives[node],
        )
        for node, bd_seq in stale.items()
    }


def state_upserts(states: Mapping[str, NodeState], read: Mapping[str, int | None]) -> list[Upsert]:
    """The writes that make the database hold `states` (node -> its state), in node order,
    after checking that each node is still at the version `read` has for it (None: absent)."""
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
    lives: tuple[list[object], ...] = ([], [], [], [])
    for node in nodes:
        for device, life in sorted(states[node].lives.items()):
            for col, v in zip(lives, (node, device, life.born_ms, life.online), strict=True):
                col.append(v)
    return [
        Upsert(_CHECK, (nodes, [read.get(n) for n in nodes])),
        Upsert(
            _UPSERT_NODES,
            (nodes, [states[n].birth_id for n in nodes], [states[n].bd_seq for n in nodes]),
        ),
        Upsert(_DELETE_METRICS, (nodes,)),
        Upsert(_INSERT_METRICS, cols),
        Upsert(_DELETE_DEVICES, (nodes,)),
        Upsert(_INSERT_DEVICES, lives),
    ]
