"""Wire-format payloads and streams, with the rows they must produce once stored."""

from __future__ import annotations

import glob
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from ingest.sim.record import read_record

if TYPE_CHECKING:
    from tests.support.mqtt import Publisher

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in µs
Row = tuple[int, str, str, float, int]  # (time µs, device, sensor, value, quality)


def new_site() -> str:
    """A site name no other test uses, so device paths (and readings) never collide."""
    return f"site-{uuid.uuid4().hex[:8]}"


def new_prefix() -> str:
    """A topic prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:10]}/telemetry"


def f8(values: Iterable[float]) -> bytes:
    """Little-endian float64 bytes: a channel's `bin` values."""
    return np.asarray(list(values), dtype="<f8").tobytes()


def batch_payload(t0: int, channels: list[dict[str, object]], *, seq: int | None = None) -> bytes:
    """A MessagePack batch of wire format version 1."""
    doc: dict[str, object] = {"v": 1, "t0": t0, "ch": channels}
    if seq is not None:
        doc["seq"] = seq
    return msgspec.msgpack.encode(doc)


def stream(
    site: str, *, devices: int, messages: int, per_message: int, seed: int = 7
) -> tuple[list[tuple[str, bytes]], set[Row]]:
    """A regular stream: each device sends `messages` batches of `per_message` readings.

    Returns (device path, payload) in publishing order and the rows they must produce.
    """
    out: list[tuple[str, bytes]] = []
    rows: set[Row] = set()
    rng = np.random.default_rng(seed)
    for m in range(messages):
        for d in range(devices):
            device = f"{site}/line1/dev-{d:02d}"
            values = np.round(rng.normal(50, 5, per_message), 6)
            t0 = T0 + m * per_message * 1000
            out.append(
                (device, batch_payload(t0, [{"s": "temp", "dt": 1000, "v": f8(values)}], seq=m))
            )
            rows.update((t0 + i * 1000, device, "temp", float(v), 0) for i, v in enumerate(values))
    return out, rows


def recorded(pattern: str, prefix: str) -> set[Row]:
    """Every reading the simulator's recordings (`ingest simulate --record`) hold, as
    `rows.stored` returns them."""
    rows: set[Row] = set()
    for path in sorted(glob.glob(pattern)):
        for topic, sensor, times, values in read_record(path):
            device = topic.removeprefix(f"{prefix}/")
            rows.update(
                (t, device, sensor, v, 0)
                for t, v in zip(times.tolist(), values.tolist(), strict=True)
            )
    return rows


def publish_series(
    pub: Publisher,
    topic: str,
    values: dict[str, np.ndarray],
    lo: int,
    hi: int,
    step: int,
    *,
    dt_us: int,
) -> int:
    """Publish readings [lo, hi) of every series, reading i at T0 + i * dt_us, in compact
    messages of `step` readings; returns how many messages."""
    sent = 0
    for start in range(lo, hi, step):
        end = min(start + step, hi)
        payload = msgspec.msgpack.encode(
            {
                "v": 1,
                "t0": T0 + start * dt_us,
                "ch": [
                    {"s": name, "dt": dt_us, "v": v[start:end].astype("<f8").tobytes()}
                    for name, v in values.items()
                ],
            }
        )
        pub.publish(topic, payload)
        sent += 1
    return sent
