"""Kernel throughput next to pandas/numpy doing the same; --benchmark-enable for readings/s."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from pytest_benchmark.fixture import BenchmarkFixture

from ingest.anomaly.detector import AnomalyDetector
from ingest.anomaly.layout import MAD_SCALE
from ingest.anomaly.rules import MAX_SPIKE_WINDOW, AnomalyRule
from ingest.asset.kernel import fresh_state
from ingest.asset.model import AssetModel, carry_forward, fit, score_matrix
from ingest.asset.rules import AssetRule
from ingest.rollup import HOUR_US, MINUTE_US, rollup
from ingest.warmup import warm_up

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
SENSORS = 1_000
PER_SENSOR = 200  # readings per sensor per flush, one a second
N = SENSORS * PER_SENSOR

RULES = {
    "range": AnomalyRule(match="*", min=-40.0, max=40.0),
    "rate": AnomalyRule(match="*", max_rate=5.0),
    "spike": AnomalyRule(match="*", spike_window=32, spike_threshold=4.0),
    "drift": AnomalyRule(match="*", drift_window=16, drift_baseline=64, drift_sigma=3.0),
    "flatline": AnomalyRule(match="*", flatline_count=10, flatline_seconds=30.0),
}
RULES["all"] = AnomalyRule(
    match="*",
    min=-40.0,
    max=40.0,
    max_rate=5.0,
    spike_window=32,
    spike_threshold=4.0,
    drift_window=16,
    drift_baseline=64,
    drift_sigma=3.0,
    flatline_count=10,
    flatline_seconds=30.0,
)

Columns = tuple[npt.NDArray[np.int32], npt.NDArray[np.int64], npt.NDArray[np.float64]]


def _flush(index: int) -> Columns:
    """Flush `index` of a plant: random walks with spikes and stuck stretches, sorted."""
    rng = np.random.default_rng(index)
    sensor = np.repeat(np.arange(SENSORS, dtype=np.int32), PER_SENSOR)
    step = np.arange(PER_SENSOR, dtype=np.int64) + index * PER_SENSOR
    time = T0 + np.tile(step, SENSORS) * 1_000_000 + rng.integers(0, 1_000, N)
    walk = np.cumsum(rng.normal(0.0, 0.5, (SENSORS, PER_SENSOR)), axis=1)
    value = (20.0 + walk).ravel()
    value[rng.random(N) < 0.002] += 60.0  # spikes, out of range too
    stuck = rng.random(SENSORS) < 0.05
    value.reshape(SENSORS, PER_SENSOR)[stuck, 50:120] = 21.5  # flatlines
    return sensor, time, value


SENSOR, TIME, VALUE = _flush(1)


# ------------------------------------------------------------------------------------------
# The equivalents: what one would write with pandas or numpy for the same quantities
# ------------------------------------------------------------------------------------------


def _runs(bad: npt.NDArray[np.bool_], boundary: npt.NDArray[np.bool_]) -> int:
    """Number of events: runs of offending readings, cut at sensor boundaries."""
    starts = bad & (boundary | ~np.r_[False, bad[:-1]])
    return int(np.count_nonzero(starts))


def _boundary(sensor: npt.NDArray[np.int32]) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = np.r_[True, sensor[1:] != sensor[:-1]]
    return out


def pandas_rollup(bucket_us: int) -> Callable[[Columns], Any]:
    def run(cols: Columns) -> Any:
        sensor, time, value = cols
        df = pd.DataFrame({"sensor": sensor, "time": time, "value": value}).dropna()
        df["bucket"] = df["time"] - df["time"] % bucket_us
        return df.groupby(["sensor", "bucket"], sort=True).agg(
            min=("value", "min"),
            max=("value", "max"),
            sum=("value", "sum"),
            count=("value", "count"),
            first=("value", "first"),
            first_time=("time", "first"),
            last=("value", "last"),
            last_time=("time", "last"),
        )

    return run


def numpy_range(cols: Columns) -> int:
    sensor, _, value = cols
    bad = (value > 40.0) | (value < -40.0)
    return _runs(bad, _boundary(sensor))


def numpy_rate(cols: Columns) -> int:
    sensor, time, value = cols
    boundary = _boundary(sensor)
    with np.errstate(divide="ignore", invalid="ignore"):  # across sensors: masked below
        rate = np.abs(np.diff(value, prepend=value[0])) / (np.diff(time, prepend=time[0]) / 1e6)
    bad = (rate > 5.0) & ~boundary
    return _runs(bad, boundary)


def numpy_spike(cols: Columns) -> int:
    sensor, _, value = cols
    w = 32
    windows = sliding_window_view(value, w)[:-1]  # the w readings before reading i + w
    med = np.median(windows, axis=1)
    mad = np.median(np.abs(windows - med[:, None]), axis=1)
    x = value[w:]
    bad = np.abs(x - med) > 4.0 * MAD_SCALE * mad
    bad &= sensor[w:] == sensor[:-w]  # window within one sensor
    return _runs(np.r_[np.zeros(w, np.bool_), bad], _boundary(sensor))


def pandas_drift(cols: Columns) -> int:
    sensor, _, value = cols
    wd, wb = 16, 64
    g = pd.Series(value).groupby(sensor)
    recent = g.rolling(wd).mean().to_numpy()
    base = g.rolling(wb)
    mean_b = base.mean().groupby(sensor).shift(wd).to_numpy()
    sd_b = base.std().groupby(sensor).shift(wd).to_numpy()
    bad = np.abs(recent - mean_b) > 3.0 * sd_b
    return _runs(bad, _boundary(sensor))


def numpy_flatline(cols: Columns) -> int:
    sensor, time, value = cols
    boundary = _boundary(sensor)
    change = boundary | np.r_[True, value[1:] != value[:-1]]
    starts = np.flatnonzero(change)
    start = starts[np.cumsum(change) - 1]
    count = np.arange(value.shape[0]) - start + 1
    bad = (count >= 10) | (time - time[start] >= 30_000_000)
    return _runs(bad, boundary)


def equivalent_all(cols: Columns) -> int:
    return sum(
        f(cols) for f in (numpy_range, numpy_rate, numpy_spike, pandas_drift, numpy_flatline)
    )


EQUIVALENTS: dict[str, tuple[str, Callable[[Columns], Any]]] = {
    "range": ("numpy", numpy_range),
    "rate": ("numpy", numpy_rate),
    "spike": ("numpy sliding median", numpy_spike),
    "drift": ("pandas rolling", pandas_drift),
    "flatline": ("numpy", numpy_flatline),
    "all": ("numpy + pandas", equivalent_all),
}


# ------------------------------------------------------------------------------------------
# The kernels, in steady state (windows already full from a committed earlier flush)
# ------------------------------------------------------------------------------------------


def kernel_rollup(bucket_us: int) -> Callable[[Columns], Any]:
    def run(cols: Columns) -> Any:
        sensor, time, value = cols
        return rollup(sensor=sensor, time=time, value=value, bucket_us=bucket_us)

    return run


def kernel_anomaly(kind: str) -> Callable[[Columns], Any]:
    detector = AnomalyDetector()
    for s in range(SENSORS):
        detector.assign(sensor_id=s, rule=RULES[kind])
    sensor, time, value = _flush(0)
    detector.commit(detector.process(sensor=sensor, time=time, value=value))

    def run(cols: Columns) -> Any:
        sensor, time, value = cols
        return detector.process(sensor=sensor, time=time, value=value)  # never committed

    return run


def _history(rule: AnomalyRule) -> Columns:
    """Each sensor's readings before flush 1, as many as restoring its state asks for."""
    probe = AnomalyDetector()
    probe.assign(sensor_id=0, rule=rule)
    need = probe.state_needed(sensor_ids=[0])[0].readings
    rng = np.random.default_rng(need)
    step = np.arange(-need, 0, dtype=np.int64) + PER_SENSOR
    time = T0 + np.tile(step, SENSORS) * 1_000_000
    walk = np.cumsum(rng.normal(0.0, 0.5, (SENSORS, need)), axis=1)
    walk -= walk[:, -1:]  # ends where flush 1 starts
    sensor = np.repeat(np.arange(SENSORS, dtype=np.int32), need)
    return sensor, time, (20.0 + walk).ravel()


def kernel_window(rule: AnomalyRule) -> Callable[[Columns], Any]:
    """A filter in steady state with its windows full, restored from history as at a start."""
    detector = AnomalyDetector()
    sensor, time, value = _history(rule)
    per = sensor.shape[0] // SENSORS
    for s in range(SENSORS):
        detector.assign(sensor_id=s, rule=rule)
        rows = slice(s * per, (s + 1) * per)
        detector.restore(sensor_id=s, time=time[rows], value=value[rows], open_events=())

    def run(cols: Columns) -> Any:
        sensor, time, value = cols
        return detector.process(sensor=sensor, time=time, value=value)  # never committed

    return run


ASSET_D = 8
"""Sensors per device in the asset-health case: the flush's 1,000 sensors are 125 devices."""
ASSET_RULE = AssetRule(match="*", hold_s=10.0)


def _asset_model() -> AssetModel:
    sensor, time, value = _flush(0)
    mine = sensor < ASSET_D
    _, x = carry_forward(sensor[mine], time[mine], value[mine], ASSET_D, hold_us=10_000_000)
    return fit([f"s{j}" for j in range(ASSET_D)], x)


def kernel_asset() -> Callable[[Columns], Any]:
    """What the flush does per device (`ingest.asset.sync`): its readings picked out and put
    in time order, then the kernel from the device's state. Every reading has a time of its
    own here, so every reading is a scored timestamp (the costliest shape)."""
    model = _asset_model()
    state = fresh_state(ASSET_D)

    def run(cols: Columns) -> Any:
        sensor, time, value = cols
        ends = np.searchsorted(sensor, np.arange(0, SENSORS + 1, ASSET_D))
        for lo, hi in itertools.pairwise(ends.tolist()):
            order = np.argsort(time[lo:hi], kind="stable")
            ints, floats = state[0].copy(), state[1].copy()
            model.run(
                (sensor[lo:hi][order] % ASSET_D).astype(np.int32),
                time[lo:hi][order],
                value[lo:hi][order],
                hold_us=ASSET_RULE.hold_us,
                gap_us=ASSET_RULE.gap_us,
                min_us=ASSET_RULE.min_us,
                ints=ints,
                floats=floats,
            )

    return run


def numpy_asset(cols: Columns) -> int:
    """The same scores with numpy: each device's vectors carried forward, then T² and Q."""
    model = _ASSET_MODEL
    sensor, time, value = cols
    ends = np.searchsorted(sensor, np.arange(0, SENSORS + 1, ASSET_D))
    bad = 0
    for lo, hi in itertools.pairwise(ends.tolist()):
        _, x = carry_forward(
            sensor[lo:hi] % ASSET_D, time[lo:hi], value[lo:hi], ASSET_D, hold_us=10_000_000
        )
        t2, q = score_matrix(model, x)
        bad += int(np.count_nonzero((t2 > model.t2_limit) | (q > model.q_limit)))
    return bad


_ASSET_MODEL = _asset_model()


WINDOWS = (16, 64, 256, 1024, 3600)
"""Window sizes of the per-window cases (spike windows stop at MAX_SPIKE_WINDOW); range, rate
and flatline keep no window and are listed once, with the hour rule's other parameters."""
HOUR_RULE = AnomalyRule(
    match="*",
    min=-40.0,
    max=40.0,
    max_rate=5.0,
    spike_window=32,
    spike_threshold=4.0,
    drift_window=60,
    drift_baseline=3600,
    drift_sigma=3.0,
    flatline_count=10,
    flatline_seconds=30.0,
)
"""All five filters, drift over an hour's baseline at one reading a second."""
WINDOW_RULES: dict[str, AnomalyRule] = {
    "range (no window)": AnomalyRule(match="*", min=-40.0, max=40.0),
    "rate (no window)": AnomalyRule(match="*", max_rate=5.0),
    "flatline (no window)": AnomalyRule(match="*", flatline_count=10, flatline_seconds=30.0),
    **{
        f"drift 16 over {w}": AnomalyRule(
            match="*", drift_window=16, drift_baseline=w, drift_sigma=3.0
        )
        for w in WINDOWS
    },
    **{
        f"spike {w}": AnomalyRule(match="*", spike_window=w, spike_threshold=4.0)
        for w in WINDOWS
        if w <= MAX_SPIKE_WINDOW
    },
    "all, drift 60 over 3600": HOUR_RULE,
    "range (the cheapest, a baseline)": AnomalyRule(match="*", min=-40.0, max=40.0),
    "auto, defaults": AnomalyRule(match="*", detector="auto"),
    "auto, window 64": AnomalyRule(match="*", detector="auto", auto_window=64),
}
SPIKE_NOT_ALLOWED = [w for w in WINDOWS if w > MAX_SPIKE_WINDOW]


CASES: dict[
    str, tuple[Callable[[], Callable[[Columns], Any]], str, Callable[[Columns], Any] | None]
] = {
    "rollup 1 min": (lambda: kernel_rollup(MINUTE_US), "pandas groupby", pandas_rollup(MINUTE_US)),
    "rollup 1 h": (lambda: kernel_rollup(HOUR_US), "pandas groupby", pandas_rollup(HOUR_US)),
    **{
        f"anomaly {kind}": ((lambda k=kind: kernel_anomaly(k)), name, fn)  # type: ignore[misc]
        for kind, (name, fn) in EQUIVALENTS.items()
    },
    **{
        f"window {name}": ((lambda r=rule: kernel_window(r)), "-", None)  # type: ignore[misc]
        for name, rule in WINDOW_RULES.items()
    },
    f"asset health, {SENSORS // ASSET_D} devices x {ASSET_D}": (
        kernel_asset,
        "numpy carry-forward + T²/Q",
        numpy_asset,
    ),
}


class _Summary:
    """Prints readings/s per core for each kernel and its equivalent after pytest-benchmark."""

    def __init__(self) -> None:
        self.rates: dict[tuple[str, str], float] = {}

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section(
            f"kernels, readings/s on one core (median; flushes of {N:,} readings, "
            f"{SENSORS:,} sensors)"
        )
        if not self.rates:
            terminalreporter.write_line("no timings: run with --benchmark-enable")
            return
        terminalreporter.write_line(
            f"{'case':<34} {'kernel':>14} {'ns/reading':>10} {'equivalent':>14}  {'ratio':>7}"
            "  equivalent is"
        )
        for case, (_, name, _) in CASES.items():
            kernel = self.rates.get((case, "kernel"))
            other = self.rates.get((case, "equivalent"))
            ratio = f"{kernel / other:6.2f}x" if kernel and other else "      -"
            k_text = f"{kernel / 1e6:10.2f} M/s" if kernel else f"{'-':>14}"
            o_text = f"{other / 1e6:10.2f} M/s" if other else f"{'-':>14}"
            ns = f"{1e9 / kernel:10.1f}" if kernel else f"{'-':>10}"
            terminalreporter.write_line(f"{case:<34} {k_text} {ns} {o_text}  {ratio}  {name}")
        for w in SPIKE_NOT_ALLOWED:
            terminalreporter.write_line(
                f"{f'window spike {w}':<34} not allowed: spike_window <= {MAX_SPIKE_WINDOW}"
            )


@pytest.fixture(scope="session")
def summary(request: pytest.FixtureRequest) -> _Summary:
    warm_up()
    plugin = _Summary()
    request.config.pluginmanager.register(plugin, "bench_kernels_summary")
    return plugin


@pytest.mark.parametrize(
    ("case", "impl"),
    [
        (case, impl)
        for case, (_, _, equivalent) in CASES.items()
        for impl in ("kernel", "equivalent")
        if impl == "kernel" or equivalent is not None
    ],
)
def test_kernel(case: str, impl: str, benchmark: BenchmarkFixture, summary: _Summary) -> None:
    make_kernel, _, equivalent = CASES[case]
    fn = make_kernel() if impl == "kernel" else equivalent
    assert fn is not None
    cols = (SENSOR, TIME, VALUE)
    benchmark.group = case
    benchmark(fn, cols)
    benchmark.extra_info["readings"] = N
    if benchmark.stats is not None:
        rate = N / benchmark.stats.stats.median
        benchmark.extra_info["readings_per_s"] = rate
        summary.rates[(case, impl)] = rate


def test_rollup_equals_pandas() -> None:
    """The pandas rollup computes the same thing (so the comparison is fair)."""
    got = rollup(sensor=SENSOR, time=TIME, value=VALUE, bucket_us=MINUTE_US)
    want = pandas_rollup(MINUTE_US)((SENSOR, TIME, VALUE))
    assert np.array_equal(got.sensor, want.index.get_level_values(0))
    assert np.array_equal(got.bucket, want.index.get_level_values(1))
    for column in ("min", "max", "count", "first", "first_time", "last", "last_time"):
        assert np.array_equal(getattr(got, column), want[column].to_numpy()), column
    assert np.allclose(got.sum, want["sum"].to_numpy())
