"""Micro-benchmark of ingest.flush.build_readings: a flush's messages to sorted columns.

The flush is what `ingest simulate` sends with the built-in plant: 167 messages of 6 channels
of 100 samples (100,200 readings). Two cases: the channels as they arrive (ordered whole by
sensor and first time, then checked), and the same flush with one reading moved back in time,
which makes the pipeline sort every reading (the path taken when channels overlap).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from ingest.db.registry import Registry, SensorKey
from ingest.decode import Batch
from ingest.flush import Accepted, FlushJob, build_readings, channel_keys

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
DEVICES = 40
SENSORS_PER_DEVICE = 6
SAMPLES = 100
MESSAGES = 167
DT_US = 100_000


def _flush(*, overlap: bool) -> tuple[FlushJob, Registry]:
    rng = np.random.default_rng(5)
    registry = Registry()
    job = FlushJob()
    for m in range(MESSAGES):
        device, step = m % DEVICES, m // DEVICES
        levels = ("plant1", "line1", f"machine-{device:02d}")
        t0 = T0 + step * SAMPLES * DT_US
        n = SENSORS_PER_DEVICE * SAMPLES
        time = np.tile(t0 + np.arange(SAMPLES, dtype=np.int64) * DT_US, SENSORS_PER_DEVICE)
        value = rng.normal(50, 5, n)
        quality = np.zeros(n, np.uint8)
        if overlap and m == MESSAGES - 1:
            time[SAMPLES - 1] = T0 - 1  # earlier than everything of that sensor
        names = tuple(f"sensor-{s}" for s in range(SENSORS_PER_DEVICE))
        for name in names:
            if SensorKey(levels, name) not in registry:
                registry._add(levels, name, len(registry) + 1, None)
        units = (None,) * SENSORS_PER_DEVICE
        counts = (SAMPLES,) * SENSORS_PER_DEVICE
        batch = Batch(m, names, units, counts, n, time, value, quality)
        job.accepted.append(Accepted(levels, batch))
        job.readings += SENSORS_PER_DEVICE * SAMPLES
    return job, registry


class _Summary:
    def __init__(self) -> None:
        self.rows: dict[str, float] = {}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("build_readings, readings/s on one core (median)")
        if not self.rows:
            terminalreporter.write_line("no timings: run with --benchmark-enable")
            return
        base = self.rows.get("sort every reading")
        for case, rate in self.rows.items():
            ratio = f"{rate / base:6.2f}x the sort" if base else ""
            terminalreporter.write_line(f"{case:<22} {rate / 1e6:8.2f} M readings/s {ratio}")


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest) -> _Summary:
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "bench_flush_summary")
    return plugin


@pytest.mark.parametrize("overlap", [False, True], ids=["channels in order", "sort every reading"])
def test_build_readings(overlap: bool, benchmark: BenchmarkFixture, summary: _Summary) -> None:
    job, registry = _flush(overlap=overlap)
    ids = [registry.get(key) for key in channel_keys(job)]
    slab, superseded = benchmark(build_readings, job, ids)
    assert superseded == 0
    assert len(slab) == job.readings
    key = slab.sensor.astype(np.int64) << 40 | (slab.time - (T0 - 1))
    assert (np.diff(key) > 0).all()
    if benchmark.stats is not None:
        summary.rows["sort every reading" if overlap else "channels in order"] = (
            job.readings / benchmark.stats.stats.median
        )
