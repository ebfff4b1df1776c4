"""The load: `ingest simulate` publisher processes, the rows they record, and decode speed."""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from benchmarks.e2e import BenchError
from benchmarks.e2e.options import Options
from benchmarks.e2e.processes import Children
from ingest.db.sink import Readings
from ingest.decode import DecodeLimits, decode_batch
from ingest.sim.record import read_record
from tests.support.process import Child

HOUR_US = 3_600_000_000


@dataclass(frozen=True, slots=True)
class Load:
    """What one publisher run sends: every sensor of the plant, `steps` messages per device."""

    sensors: int
    steps: int
    batch: int
    hz: float

    @property
    def readings(self) -> int:
        return self.sensors * self.steps * self.batch

    @property
    def duration_s(self) -> float:
        """Simulated seconds per device that make `ingest simulate` send exactly `steps`."""
        duration = self.steps * self.batch / self.hz
        while math.ceil(duration * self.hz / self.batch) > self.steps:
            duration = math.nextafter(duration, 0.0)
        return duration

    @property
    def span_us(self) -> int:
        return math.ceil(self.steps * self.batch * 1e6 / self.hz)


def iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")


def budget(load: Load) -> float:
    """A bound on how long `load` may take to publish or to ingest (20k readings/s at worst)."""
    return max(120.0, load.readings / 20_000)


async def start_publishers(
    children: Children,
    opts: Options,
    name: str,
    *,
    url: str,
    prefix: str,
    start_us: int,
    load: Load,
    processes: int,
    rate: float = 0.0,
    record: Path | None = None,
) -> Child:
    """`ingest simulate` publishing `load` under `prefix` (paced at `rate` readings/s if not
    0), its rows recorded into `record`.<n> when given."""
    flags = {
        "--url": url,
        "--prefix": prefix,
        "--hz": repr(opts.hz),
        "--batch": str(opts.batch),
        "--format": opts.fmt,
        "--start": iso(start_us),
        "--duration": repr(load.duration_s),
        "--processes": str(processes),
        "--rate": repr(rate),
    }
    if opts.devices:
        flags["--devices"] = str(opts.devices)
    if opts.plant:
        flags["--plant"] = str(opts.plant)
    if record is not None:
        flags["--record"] = str(record)
    argv = [sys.executable, "-m", "ingest.cli", "simulate", "--quiet"]
    for flag, value in flags.items():
        argv += [flag, value]
    return await children.start(name, argv)


async def finish_publishers(child: Child, *, timeout: float) -> float:  # noqa: ASYNC109
    """Wait for a publisher; returns its readings/s."""
    code = await child.wait(timeout=timeout, doing="publishing")
    if code != 0:
        raise BenchError(f"{child.name} exited with status {code}{child.tail()}")
    return _published_rate(child)


def _published_rate(child: Child) -> float:
    """Readings/s from `ingest simulate`'s last line (its time includes starting its workers)."""
    text = child.output.decode(errors="replace")
    match = re.search(r"done, ([\d,]+) readings in ([\d.]+)s", text)
    if not match:
        raise BenchError(f"{child.name}: no 'done' line in its output{child.tail()}")
    return int(match.group(1).replace(",", "")) / max(float(match.group(2)), 1e-9)


def recorded_slabs(paths: list[Path], *, slab: int) -> tuple[list[Readings], int]:
    """The recorded load as flush-sized slabs: messages in publication order (by time, then
    sensor), cut every `slab` readings, each slab sorted by (sensor, time) as a flush is."""
    ids: dict[tuple[str, str], int] = {}
    channels: list[tuple[int, int, np.ndarray, np.ndarray]] = []
    for path in paths:
        for topic, name, times, values in read_record(str(path)):
            sensor = ids.setdefault((topic, name), len(ids) + 1)
            channels.append((int(times[0]), sensor, times, values))
    if not channels:
        raise BenchError("the recording holds no readings")
    channels.sort(key=lambda c: (c[0], c[1]))
    time_col = np.concatenate([c[2] for c in channels])
    value_col = np.concatenate([c[3] for c in channels])
    sensor_col = np.concatenate([np.full(len(c[2]), c[1], dtype=np.int32) for c in channels])
    slabs = []
    for lo in range(0, len(time_col), slab):
        t, s, v = time_col[lo : lo + slab], sensor_col[lo : lo + slab], value_col[lo : lo + slab]
        order = np.lexsort((t, s))
        zeros = np.zeros(len(order), dtype=np.uint8)
        slabs.append(Readings(t[order], s[order], v[order], zeros))
    return slabs, len(time_col)


def _first_message(path: Path) -> list[tuple[str, np.ndarray]]:
    """The channels of a recording's first message (until the topic changes or a name repeats)."""
    topic, channels = "", list[tuple[str, np.ndarray]]()
    for t, name, _, values in read_record(str(path)):
        if channels and (t != topic or any(name == c[0] for c in channels)):
            break
        topic = t
        channels.append((name, values))
    if not channels:
        raise BenchError(f"the recording {path} holds no readings")
    return channels


def _encode(fmt: str, channels: list[tuple[str, np.ndarray]]) -> tuple[bytes, str]:
    """A wire-format batch as `ingest simulate` encodes it (regular sampling, `dt`)."""
    t0, dt = 1_767_225_000_000_000, 100_000
    if fmt == "json":
        body = {"v": 1, "t0": t0, "ch": [{"s": s, "dt": dt, "v": v.tolist()} for s, v in channels]}
        return msgspec.json.encode(body), "application/json"
    chs = [{"s": s, "dt": dt, "v": v.astype("<f8").tobytes()} for s, v in channels]
    return msgspec.msgpack.encode({"v": 1, "t0": t0, "ch": chs}), "application/msgpack"


def measure_decode(fmt: str, record: Path, batch: int) -> dict[str, Any]:
    """decode_batch per core (process time): one message as published here, and a big batch."""
    rng = np.random.default_rng(3)
    cases = {
        f"message as published here ({batch} samples per channel)": _first_message(record),
        "100 channels x 1000 samples": [(f"s{i}", rng.normal(50, 5, 1000)) for i in range(100)],
    }
    limits = DecodeLimits(max_payload_bytes=64 * 1_048_576)
    now = 1_767_225_600_000_000
    out: dict[str, Any] = {}
    for name, channels in cases.items():
        payload, ctype = _encode(fmt, channels)
        readings = decode_batch(payload, content_type=ctype, limits=limits, now_us=now).readings
        n, started = 0, time.process_time()
        while time.process_time() - started < 0.5:
            for _ in range(20):
                decode_batch(payload, content_type=ctype, limits=limits, now_us=now)
            n += 20
        out[name] = {
            "payload_bytes": len(payload),
            "readings": readings,
            "readings_per_s_per_core": readings * n / (time.process_time() - started),
        }
    return out
