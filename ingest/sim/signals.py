"""What a simulated sensor reads over time, and the anomalies injected into it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from ingest.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Anomaly:
    """An injected condition: `kind` on sensors matching `pattern` from `at_s` simulated seconds."""

    kind: Literal["spike", "drift", "flatline", "overheat"]
    pattern: str  # glob on device-path/sensor
    at_s: float
    duration_s: float = 60.0

    @staticmethod
    def parse(text: str) -> Anomaly:
        """`spike:plant1/*/press-01/spindle.temp@30` or `flatline:...@60+120` (start+duration)."""
        try:
            kind, rest = text.split(":", 1)
            pattern, when = rest.rsplit("@", 1)
            at, _, duration = when.partition("+")
            if kind not in ("spike", "drift", "flatline", "overheat"):
                raise ValueError
            return Anomaly(kind, pattern, float(at), float(duration) if duration else 60.0)  # type: ignore[arg-type]
        except ValueError:
            raise ConfigError(
                f"--anomaly {text!r}: expected KIND:DEVICE/SENSOR-GLOB@SECONDS[+DURATION] "
                "with KIND spike, drift, flatline or overheat"
            ) from None


class Signal:
    """Values of one sensor over simulated time, generated a batch at a time."""

    def __init__(self, kind: str, seed: int) -> None:
        self.kind = kind
        self.rng = np.random.default_rng(seed)
        self.base = {
            "temperature": 55.0,
            "vibration": 2.0,
            "current": 12.0,
            "pressure": 160.0,
            "counter": 0.0,
            "energy": 1000.0,
        }[kind] * (0.8 + 0.4 * self.rng.random())
        self.total = self.base

    def values(self, t_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        n = len(t_s)
        noise = self.rng.standard_normal(n)
        if self.kind == "temperature":
            return self.base + 3.0 * np.sin(2 * math.pi * t_s / 900.0) + 0.2 * noise
        if self.kind == "vibration":
            return np.abs(self.base + 0.3 * np.sin(2 * math.pi * t_s / 7.0) + 0.1 * noise)
        if self.kind == "current":
            cycle = (np.floor(t_s / 20.0) % 2 == 0).astype(np.float64)
            out: npt.NDArray[np.float64] = self.base * (0.6 + 0.4 * cycle) + 0.3 * noise
            return out
        if self.kind == "pressure":
            return self.base + 2.0 * np.sin(2 * math.pi * t_s / 60.0) + 0.5 * noise
        if self.kind == "counter":
            steps = (self.rng.random(n) < 0.1).astype(np.float64)
            out = self.total + np.cumsum(steps)
            self.total = float(out[-1])
            return out
        steps = np.abs(0.001 + 0.0002 * noise)  # energy meter: kWh, always rising
        out = self.total + np.cumsum(steps)
        self.total = float(out[-1])
        return out


def inject(
    values: npt.NDArray[np.float64],
    t_s: npt.NDArray[np.float64],
    anomaly: Anomaly,
    *,
    scale: float,
    period_s: float,
    held: dict[Anomaly, float],
) -> None:
    """Apply an injected anomaly in place to the samples at simulated seconds `t_s`.

    A flatline holds the first value it covers (rounded to 3 decimals) across batches; that
    value is kept in `held`, one mapping per sensor.
    """
    if anomaly.kind == "spike":
        # One sample: the first at or after the start time.
        values[(t_s >= anomaly.at_s) & (t_s < anomaly.at_s + period_s)] += 50.0 * max(scale, 1.0)
    elif anomaly.kind == "overheat":
        # A step up for the whole duration: 10x a tenth of the sensor's normal level (a
        # spindle at 44-66 degC then reads 84-132 degC).
        inside = (t_s >= anomaly.at_s) & (t_s < anomaly.at_s + anomaly.duration_s)
        values[inside] += 10.0 * max(scale, 1.0)
    elif anomaly.kind == "drift":
        inside = (t_s >= anomaly.at_s) & (t_s < anomaly.at_s + anomaly.duration_s)
        ramp = np.clip((t_s - anomaly.at_s) / max(anomaly.duration_s, 1e-9), 0, 1)
        values[inside] += 10.0 * max(scale, 1.0) * ramp[inside]
    else:
        inside = (t_s >= anomaly.at_s) & (t_s < anomaly.at_s + anomaly.duration_s)
        if inside.any():
            values[inside] = held.setdefault(anomaly, round(float(values[inside][0]), 3))
