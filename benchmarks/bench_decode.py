"""Micro-benchmarks of ingest.decode per encoding; run with --benchmark-enable for readings/s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import numpy as np
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from ingest.decode import Batch, DecodeLimits, decode_batch

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
NOW = T0 + 3_600_000_000
SAMPLES = 1_000  # per channel
# Large JSON cases exceed the default 1 MiB payload limit; the limit is not what is measured.
LIMITS = DecodeLimits(max_payload_bytes=64 * 1_048_576, max_readings=10_000_000)

_rng = np.random.default_rng(7)


def _values(n: int = SAMPLES) -> np.ndarray[Any, np.dtype[np.float64]]:
    return _rng.normal(50.0, 5.0, n)


def _batch(channels: list[dict[str, Any]]) -> dict[str, Any]:
    return {"v": 1, "t0": T0, "seq": 1, "ch": channels}


def _msgpack_bin_f8_dt(n_channels: int) -> bytes:
    return msgspec.msgpack.encode(
        _batch(
            [
                {"s": f"s{i}", "dt": 1_000, "v": _values().astype("<f8").tobytes(), "u": "degC"}
                for i in range(n_channels)
            ]
        )
    )


def _msgpack_bin_f4_dt(n_channels: int) -> bytes:
    return msgspec.msgpack.encode(
        _batch(
            [
                {"s": f"s{i}", "dt": 1_000, "vt": "f4", "v": _values().astype("<f4").tobytes()}
                for i in range(n_channels)
            ]
        )
    )


def _msgpack_bin_t_q(n_channels: int) -> bytes:
    offsets = np.cumsum(_rng.integers(900, 1_100, SAMPLES)).astype("<i8").tobytes()
    quality = np.zeros(SAMPLES, dtype=np.uint8).tobytes()
    return msgspec.msgpack.encode(
        _batch(
            [
                {"s": f"s{i}", "t": offsets, "q": quality, "v": _values().astype("<f8").tobytes()}
                for i in range(n_channels)
            ]
        )
    )


def _msgpack_arrays(n_channels: int) -> bytes:
    return msgspec.msgpack.encode(
        _batch([{"s": f"s{i}", "dt": 1_000, "v": _values().tolist()} for i in range(n_channels)])
    )


def _json_batch(n_channels: int) -> bytes:
    return msgspec.json.encode(
        _batch(
            [
                {"s": f"s{i}", "dt": 1_000, "v": np.round(_values(), 3).tolist()}
                for i in range(n_channels)
            ]
        )
    )


def _json_single(n_sensors: int) -> bytes:
    values = {f"sensor.{i}": round(float(x), 3) for i, x in enumerate(_values(n_sensors))}
    return msgspec.json.encode({"ts": "2026-01-01T00:00:00.250Z", "values": values})


def _json_sample_array(n_samples: int) -> bytes:
    return msgspec.json.encode(
        [
            {
                "ts": T0 + k * 1_000_000,
                "values": {f"sensor.{i}": round(float(x), 3) for i, x in enumerate(_values(10))},
            }
            for k in range(n_samples)
        ]
    )


CASES: dict[str, tuple[Callable[[int], bytes], int, str | None]] = {
    # name: (payload builder, size argument, content type)
    "msgpack-bin-f8-dt-100x1000": (_msgpack_bin_f8_dt, 100, "application/msgpack"),
    "msgpack-bin-f8-dt-1x1000": (_msgpack_bin_f8_dt, 1, "application/msgpack"),
    "msgpack-bin-f4-dt-100x1000": (_msgpack_bin_f4_dt, 100, "application/msgpack"),
    "msgpack-bin-f8-t-q-50x1000": (_msgpack_bin_t_q, 50, "application/msgpack"),
    "msgpack-arrays-100x1000": (_msgpack_arrays, 100, "application/msgpack"),
    "json-batch-100x1000": (_json_batch, 100, "application/json"),
    "json-single-sample-10": (_json_single, 10, "application/json"),
    "json-sample-array-100x10": (_json_sample_array, 100, None),
}


class _Summary:
    """Prints readings/s per case after pytest-benchmark's table."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, int, float]] = []

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("decode throughput (median time per payload)")
        if not self.rows:
            terminalreporter.write_line("no timings: run with --benchmark-enable")
            return
        for case, size, readings, rate in self.rows:
            terminalreporter.write_line(
                f"{case:<28} {size:>9,} B {readings:>8,} readings  {rate / 1e6:9.2f} M readings/s"
            )


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest) -> _Summary:
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "bench_decode_summary")
    return plugin


@pytest.mark.parametrize("case", list(CASES))
def test_decode(case: str, benchmark: BenchmarkFixture, summary: _Summary) -> None:
    build, size, content_type = CASES[case]
    payload = build(size)

    def run() -> Batch:
        return decode_batch(payload, content_type=content_type, limits=LIMITS, now_us=NOW)

    result = benchmark(run)
    assert isinstance(result, Batch)
    readings = result.readings
    benchmark.extra_info["readings"] = readings
    benchmark.extra_info["payload_bytes"] = len(payload)
    if benchmark.stats is not None:
        median = benchmark.stats.stats.median
        benchmark.extra_info["readings_per_s"] = readings / median
        summary.rows.append((case, len(payload), readings, readings / median))
