"""A device's asset-health model: PCA of its standardized sensors over a healthy baseline, with
limits for Hotelling's T² and the residual Q taken from the baseline's own scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from ingest.asset.kernel import advance, advance_many, fresh_state

__all__ = ["AssetModel", "carry_forward", "fit", "run_many", "score_matrix"]

SCALE_FLOOR = 1e-9
"""A sensor's scale is at least this fraction of its mean's magnitude (and 1e-12): a sensor
that did not move in the baseline does not divide by zero."""


@dataclass(frozen=True, slots=True)
class AssetModel:
    """One device's model. `sensors` are the model's sensor names (ascending sensor ids)."""

    sensors: tuple[str, ...]
    mean: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    loadings: npt.NDArray[np.float64]  # d x k, orthonormal columns
    eigenvalues: npt.NDArray[np.float64]  # k
    t2_limit: float
    q_limit: float
    samples: int
    quantile: float
    margin: float
    _args: tuple[npt.NDArray[np.float64], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # What the kernel takes, made once: mean, 1 / scale, loadings (C order), 1 / eigenvalues.
        args = (
            np.ascontiguousarray(self.mean, np.float64),
            1.0 / np.ascontiguousarray(self.scale, np.float64),
            np.ascontiguousarray(self.loadings, np.float64),
            1.0 / np.ascontiguousarray(self.eigenvalues, np.float64),
        )
        object.__setattr__(self, "_args", args)

    @property
    def components(self) -> int:
        return int(self.loadings.shape[1])

    def run(
        self,
        sensor: npt.NDArray[np.int32],
        time: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        *,
        hold_us: int,
        gap_us: int,
        min_us: int,
        ints: npt.NDArray[np.int64],
        floats: npt.NDArray[np.float64],
    ) -> tuple[
        npt.NDArray[np.int64],
        npt.NDArray[np.float64],
        npt.NDArray[np.int64],
        npt.NDArray[np.float64],
    ]:
        """`ingest.asset.kernel.advance` with this model: readings sorted by time, `sensor` the
        model index of each; the state (`ints`, `floats`) advances in place."""
        mean, inv_scale, loadings, inv_eig = self._args
        return advance(
            np.ascontiguousarray(sensor, np.int32),
            np.ascontiguousarray(time, np.int64),
            np.ascontiguousarray(value, np.float64),
            mean,
            inv_scale,
            loadings,
            inv_eig,
            float(self.t2_limit),
            float(self.q_limit),
            int(hold_us),
            int(gap_us),
            int(min_us),
            ints,
            floats,
        )


def run_many(
    models: Sequence[AssetModel],
    spans: npt.NDArray[np.int64],
    bounds: npt.NDArray[np.int64],
    sensor: npt.NDArray[np.int32],
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    ints: npt.NDArray[np.int64],
    floats: npt.NDArray[np.float64],
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.float64],
]:
    """`AssetModel.run` for many devices in one kernel call (`kernel.advance_many`): device j
    has model `models[j]`, (hold, gap, min) `spans[j]`, readings [bounds[j], bounds[j + 1])
    grouped by device and in time order within each, and its state next in `ints` and
    `floats`, which advance in place. Returns each device's count of distinct times and the
    events with their device."""
    args = [m._args for m in models]
    dims = np.array([m.loadings.shape for m in models], np.int64).reshape(len(models), 2)
    limits = np.array([(m.t2_limit, m.q_limit) for m in models], np.float64).reshape(-1, 2)
    return advance_many(
        np.ascontiguousarray(bounds, np.int64),
        np.ascontiguousarray(sensor, np.int32),
        np.ascontiguousarray(time, np.int64),
        np.ascontiguousarray(value, np.float64),
        dims,
        np.concatenate([a[0] for a in args]),
        np.concatenate([a[1] for a in args]),
        np.concatenate([a[2].ravel() for a in args]),
        np.concatenate([a[3] for a in args]),
        limits,
        np.ascontiguousarray(spans, np.int64).reshape(-1, 3),
        ints,
        floats,
    )


def carry_forward(
    sensor: npt.NDArray[np.int32],
    time: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    d: int,
    *,
    hold_us: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """The device's vectors: at each distinct time (readings sorted by time, `sensor` the model
    index 0..d-1), every sensor's last finite value at most `hold_us` old; the times where
    some sensor has none are left out."""
    order = np.argsort(time, kind="stable")
    sensor, time, value = sensor[order], time[order], value[order]
    times = np.unique(time)
    rows = np.full((len(times), d), np.nan)
    at = np.searchsorted(times, time)
    ok = np.isfinite(value)
    rows[at[ok], sensor[ok]] = value[ok]
    last_t = np.full((len(times), d), np.iinfo(np.int64).min, np.int64)
    last_t[at[ok], sensor[ok]] = times[at[ok]]
    # Carry each column's last value (and its time) forward over the rows without one.
    idx = np.where(np.isnan(rows), 0, np.arange(len(times))[:, None])
    np.maximum.accumulate(idx, axis=0, out=idx)
    filled = rows[idx, np.arange(d)]
    seen = last_t[idx, np.arange(d)]
    fresh = ~np.isnan(filled) & (times[:, None] - seen <= hold_us)
    keep = fresh.all(axis=1)
    return times[keep], filled[keep]


def _pca(
    z: npt.NDArray[np.float64], variance: float, max_components: int | None
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    cov = np.cov(z, rowvar=False, ddof=1)
    eig, vec = np.linalg.eigh(np.atleast_2d(cov))
    order = np.argsort(eig)[::-1]
    eig, vec = np.maximum(eig[order], 0.0), vec[:, order]
    total = float(eig.sum())
    k = int(np.searchsorted(np.cumsum(eig) / total, variance) + 1) if total > 0 else 1
    k = min(k, z.shape[1] - 1) if z.shape[1] > 1 else 1
    if max_components is not None:
        k = min(k, max_components)
    k = max(k, 1)
    # A sign convention, so that one baseline always gives the same loadings.
    signs = np.where(vec[np.abs(vec).argmax(axis=0), np.arange(vec.shape[1])] < 0, -1.0, 1.0)
    vec = vec * signs
    floor = max(total, 1.0) * 1e-12
    return vec[:, :k].copy(), np.maximum(eig[:k], floor)


def score_matrix(
    model: AssetModel, x: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """T² and Q of each row of `x` (vectors in the model's sensor order), in numpy."""
    z = (x - model.mean) / model.scale
    a = z @ model.loadings
    t2 = (a * a / model.eigenvalues).sum(axis=1)
    q = np.maximum((z * z).sum(axis=1) - (a * a).sum(axis=1), 0.0)
    return t2, q


def fit(
    sensors: Sequence[str],
    x: npt.NDArray[np.float64],
    *,
    variance: float = 0.99,
    max_components: int | None = None,
    quantile: float = 0.995,
    margin: float = 1.1,
) -> AssetModel:
    """Fit a model to baseline vectors `x` (one row per device timestamp, one column per sensor).

    Each sensor is standardized by its baseline mean and standard deviation; the principal
    components explaining `variance` of the standardized data are kept (at most d - 1, so
    that Q measures something, and at most `max_components`). Each limit is the `quantile` of
    the baseline's own T² (or Q) times `margin`.
    """
    x = np.asarray(x, np.float64)
    n, d = x.shape
    if d < 2:
        raise ValueError(f"a model needs at least 2 sensors with readings, got {d}")
    if n < 10 * d:
        raise ValueError(f"a model of {d} sensors needs at least {10 * d} timestamps, got {n}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0, ddof=1)
    scale = np.maximum(scale, np.maximum(np.abs(mean) * SCALE_FLOOR, 1e-12))
    loadings, eig = _pca((x - mean) / scale, variance, max_components)
    model = AssetModel(tuple(sensors), mean, scale, loadings, eig, 1.0, 1.0, n, quantile, margin)
    t2, q = score_matrix(model, x)
    t2_limit = float(np.quantile(t2, quantile)) * margin
    q_limit = float(np.quantile(q, quantile)) * margin
    return AssetModel(
        tuple(sensors),
        mean,
        scale,
        loadings,
        eig,
        max(t2_limit, 1e-12),
        max(q_limit, 1e-12),
        n,
        quantile,
        margin,
    )


def compile_kernels() -> None:
    """Compile, or load from the on-disk cache, the asset kernel (see `ingest.warmup`)."""
    model = AssetModel(
        ("a", "b"),
        np.zeros(2),
        np.ones(2),
        np.array([[1.0], [0.0]]),
        np.ones(1),
        1.0,
        1.0,
        20,
        0.99,
        1.0,
    )
    ints, floats = fresh_state(2)
    model.run(
        np.array([0, 1, 0], np.int32),
        np.array([1, 1, 2], np.int64),
        np.array([0.5, 3.0, 0.1]),
        hold_us=10,
        gap_us=0,
        min_us=0,
        ints=ints,
        floats=floats,
    )
    ints, floats = fresh_state(2)
    run_many(
        [model],
        np.array([[10, 0, 0]], np.int64),
        np.array([0, 3], np.int64),
        np.array([0, 1, 0], np.int32),
        np.array([1, 1, 2], np.int64),
        np.array([0.5, 3.0, 0.1]),
        ints,
        floats,
    )
