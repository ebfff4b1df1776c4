"""Micro-benchmark of ingest.db.sink.encode_copy (binary COPY data of a slab): readings/s."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from ingest.db.sink import Readings, encode_copy

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
SENSORS = 240  # the simulator's built-in plant
READINGS = 100_000  # the default flush size (INGEST_FLUSH_MAX_READINGS)


def _slab(n: int = READINGS) -> Readings:
    """A flush-sized slab as the pipeline builds it: sorted by (sensor, time), 10 Hz samples."""
    per_sensor = -(-n // SENSORS)
    sensor = np.repeat(np.arange(1, SENSORS + 1, dtype=np.int32), per_sensor)[:n]
    step = np.tile(np.arange(per_sensor, dtype=np.int64), SENSORS)[:n]
    rng = np.random.default_rng(11)
    return Readings(
        time=T0 + step * 100_000,
        sensor=sensor,
        value=rng.normal(50.0, 5.0, n),
        quality=np.zeros(n, dtype=np.uint8),
    )


class _Summary:
    """Prints readings/s per case after pytest-benchmark's table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, float]] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("COPY encoding throughput (median time per slab)")
        if not self.rows:
            terminalreporter.write_line("no timings: run with --benchmark-enable")
            return
        for case, readings, nbytes, rate in self.rows:
            terminalreporter.write_line(
                f"{case:<18} {readings:>9,} readings {nbytes:>11,} B {rate / 1e6:8.2f} M readings/s"
            )


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest) -> _Summary:
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "bench_copy_summary")
    return plugin


@pytest.mark.parametrize("positions", [False, True], ids=["readings", "staged-with-pos"])
def test_encode_copy(positions: bool, benchmark: BenchmarkFixture, summary: _Summary) -> None:
    slab = _slab()

    def run() -> memoryview:
        return encode_copy(slab, positions=positions)

    data = benchmark(run)
    # 19-byte header, 2-byte trailer; 40 bytes a row (48 with the position).
    assert len(data) == 19 + READINGS * (48 if positions else 40) + 2
    benchmark.extra_info["readings"] = READINGS
    benchmark.extra_info["bytes"] = len(data)
    if benchmark.stats is not None:
        rate = READINGS / benchmark.stats.stats.median
        benchmark.extra_info["readings_per_s"] = rate
        case = "staged-with-pos" if positions else "readings"
        summary.rows.append((case, READINGS, len(data), rate))
