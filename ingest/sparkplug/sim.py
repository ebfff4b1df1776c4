"""`ingest simulate --format sparkplug`: the plant's devices as Sparkplug B edge nodes.

Each line of the plant is an edge node (group: the site; edge node: the line's levels joined
by `.`; device: the device id). A node connects with its NDEATH as will message, sends NBIRTH
(bdSeq, `Node Control/Rebirth`) and a DBIRTH per device (every sensor with name, alias,
datatype and first sample), then DDATA by alias only, and at the end a DDEATH per device and a
disconnect that makes the broker publish the will. Published with ``ingest.sim.publisher``, one
blocking connection per edge node; rebirth commands are read between steps of the run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from ingest.errors import IngestError, PayloadError
from ingest.sim.publisher import Publisher, TlsFiles
from ingest.sparkplug.encode import Metric, encode_payload
from ingest.sparkplug.kernel import C_DATATYPE
from ingest.sparkplug.values import OK, metric_values
from ingest.sparkplug.wire import decode_payload

__all__ = ["SimDevice", "edge_nodes", "simulate_sparkplug"]

_NO_PROPERTIES: Final = b"\x00"
_WITH_WILL: Final = 0x04  # DISCONNECT reason: Disconnect with Will Message

# Sensor kind -> (datatype, base, amplitude, noise)
_KINDS = {
    "temperature": (10, 60.0, 5.0, 0.2),
    "vibration": (9, 2.0, 0.5, 0.1),
    "current": (9, 12.0, 2.0, 0.3),
    "pressure": (10, 180.0, 10.0, 1.0),
    "counter": (3, 0.0, 0.0, 0.0),  # Int32, counts up
    "energy": (10, 1000.0, 0.0, 0.0),
}


@dataclass(frozen=True, slots=True)
class SimDevice:
    path: str  # the plant's device path: site/area/line/.../device
    sensors: tuple[tuple[str, str], ...]  # (name, kind)
    seed: int


@dataclass(frozen=True, slots=True)
class _Node:
    group: str
    edge: str
    devices: tuple[SimDevice, ...]


def edge_nodes(devices: Sequence[SimDevice]) -> list[_Node]:
    """Devices grouped into edge nodes: group = first level, edge = the levels between."""
    nodes: dict[tuple[str, str], list[SimDevice]] = {}
    for d in devices:
        levels = d.path.split("/")
        group = levels[0] if len(levels) > 1 else "plant"
        edge = ".".join(levels[1:-1]) or "edge"
        nodes.setdefault((group, edge), []).append(d)
    return [_Node(g, e, tuple(ds)) for (g, e), ds in nodes.items()]


def _values(kind: str, seed: int, index: npt.NDArray[np.int64], hz: float) -> list[float | int]:
    datatype, base, amplitude, noise = _KINDS.get(kind, (10, 0.0, 1.0, 0.1))
    if kind == "counter":
        return [int(i // max(1, round(hz))) for i in index]
    if kind == "energy":
        return [round(base + i / hz * 0.01, 4) for i in index]
    rng = np.random.default_rng([seed, int(index[0]) if len(index) else 0])
    t = index / hz
    v = base + amplitude * np.sin(2 * math.pi * t / 60 + seed % 7) + rng.normal(0, noise, len(t))
    if datatype == 9:
        return [float(np.float32(x)) for x in v]
    return [round(float(x), 6) for x in v]


class _Edge:
    """One edge node's MQTT session."""

    def __init__(
        self, url: str, node: _Node, *, client_id: str, tls: TlsFiles | None, rebirth: bool
    ) -> None:
        self.node = node
        self.rebirth = False  # set by a rebirth command, cleared by the births
        self.base = f"spBv1.0/{node.group}"
        self.seq = 0
        self.bd_seq = 0
        death = encode_payload(
            timestamp=None, seq=None, metrics=[Metric("bdSeq", datatype=4, value=self.bd_seq)]
        )
        self.client = Publisher(
            url,
            client_id,
            tls=tls,
            will=(f"{self.base}/NDEATH/{node.edge}", death, 1),
        )
        self.commands = f"{self.base}/NCMD/{node.edge}"
        if rebirth:
            try:
                self.client.subscribe(self.commands, qos=0)
            except IngestError:
                self.client.close()
                raise

    def poll(self) -> None:
        """Read the commands that arrived: NCMD `Node Control/Rebirth` = true sets `rebirth`."""
        for message in self.client.received():
            if message.topic == self.commands and self._asks_rebirth(message.payload):
                self.rebirth = True

    @staticmethod
    def _asks_rebirth(payload: bytes) -> bool:
        try:
            decoded = decode_payload(payload, max_metrics=1000)
            names = [decoded.name(i) for i in range(len(decoded))]
        except PayloadError:
            return False
        value, status = metric_values(decoded.rows, decoded.rows[:, C_DATATYPE])
        return any(
            name == "Node Control/Rebirth" and ok == OK and v == 1.0
            for name, v, ok in zip(names, value.tolist(), status.tolist(), strict=True)
        )

    def publish(self, kind: str, device: str | None, metrics: list[Metric], ts: int) -> None:
        topic = f"{self.base}/{kind}/{self.node.edge}" + (f"/{device}" if device else "")
        data = encode_payload(timestamp=ts, seq=self.seq, metrics=metrics)
        self.seq = (self.seq + 1) % 256
        self.client.publish(topic, data, qos=1, properties=_NO_PROPERTIES)

    def idle(self, seconds: float) -> None:
        """Wait, reading acknowledgements and commands and keeping the connection alive."""
        self.client.idle(seconds)

    def die(self) -> None:
        """Disconnect with the will: the broker publishes the NDEATH."""
        self.client.settle(timeout=60)
        self.client.close(_WITH_WILL)


def _births(edge: _Edge, table: dict[tuple[str, str], int], index: int, ms: int, hz: float) -> int:
    """NBIRTH and a DBIRTH per device with sample `index` at `ms`; the metrics sent."""
    node_metrics = [
        Metric("bdSeq", datatype=4, value=edge.bd_seq),
        Metric("Node Control/Rebirth", alias=1, datatype=11, value=False),
    ]
    edge.publish("NBIRTH", None, node_metrics, ms)
    sent = 2
    at = np.array([index], np.int64)
    for d in edge.node.devices:
        births = [
            Metric(
                s,
                alias=table[(d.path, s)],
                timestamp=ms,
                datatype=_KINDS.get(kind, (10,))[0],
                value=_values(kind, d.seed, at, hz)[0],
            )
            for s, kind in d.sensors
        ]
        edge.publish("DBIRTH", d.path.rsplit("/", 1)[-1], births, ms)
        sent += len(births)
    return sent


def simulate_sparkplug(
    *,
    url: str,
    devices: Sequence[SimDevice],
    hz: float,
    batch: int,
    start_us: int,
    duration_s: float,
    realtime: bool,
    tls: TlsFiles | None = None,
    client_prefix: str = "sim-spb",
    answer_rebirth: bool = False,
) -> int:
    """Publish births, data and deaths for every edge node; returns the readings sent.
    Sample times are whole milliseconds (Sparkplug's resolution), so `hz` is at most 1000.
    With `answer_rebirth`, a node that receives NCMD `Node Control/Rebirth` = true sends its
    NBIRTH (seq 0) and DBIRTHs again, with the next samples, before its next data."""
    if hz > 1000:
        raise IngestError("simulate: Sparkplug timestamps are milliseconds: --hz must be <= 1000")
    nodes = edge_nodes(devices)
    dt_ms = 1000.0 / hz
    start_ms = start_us // 1000
    steps = math.ceil(duration_s * hz / batch) if duration_s else 0
    edges = [
        _Edge(
            url,
            n,
            client_id=f"{client_prefix}-{i}-{time.time_ns() % 10**9}",
            tls=tls,
            rebirth=answer_rebirth,
        )
        for i, n in enumerate(nodes)
    ]
    aliases = [
        {
            (d.path, s): 2 + k
            for k, (d, s) in enumerate((d, s) for d in e.node.devices for s, _ in d.sensors)
        }
        for e in edges
    ]
    sent = sum(_births(e, table, 0, start_ms, hz) for e, table in zip(edges, aliases, strict=True))
    step = 0
    while steps == 0 or step < steps:
        index = np.arange(step * batch + 1, (step + 1) * batch + 1, dtype=np.int64)
        ms = [start_ms + round(i * dt_ms) for i in index]
        for edge, table in zip(edges, aliases, strict=True):
            e_index, e_ms = index, ms
            if answer_rebirth:
                edge.poll()
            if edge.rebirth:  # births with this step's first sample, data after
                edge.rebirth = False
                edge.seq = 0
                sent += _births(edge, table, int(index[0]), ms[0], hz)
                e_index, e_ms = index[1:], ms[1:]
                if not e_ms:
                    continue
            for d in edge.node.devices:
                data = []
                for s, kind in d.sensors:
                    kind_type = _KINDS.get(kind, (10,))[0]
                    for t, v in zip(e_ms, _values(kind, d.seed, e_index, hz), strict=True):
                        data.append(
                            Metric(alias=table[(d.path, s)], timestamp=t, value=v, kind=kind_type)
                        )
                edge.publish("DDATA", d.path.rsplit("/", 1)[-1], data, e_ms[-1])
                sent += len(data)
        if realtime:
            left = max(0.0, ms[-1] / 1000 - time.time())
            for edge in edges:  # each edge waits its share, answering pings and reading NCMD
                edge.idle(left / len(edges))
        step += 1
    end_ms = start_ms + round((step * batch + 1) * dt_ms)
    for edge in edges:
        for d in edge.node.devices:
            edge.publish("DDEATH", d.path.rsplit("/", 1)[-1], [], end_ms)
        edge.die()
    return sent
