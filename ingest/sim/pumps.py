"""Simulated pumps: devices of correlated sensors driven by one operating point, with injected
faults that shift several sensors jointly, each by a few times its own noise (far inside its
normal range), and the labels of those faults.

Every sensor follows the pump's load u(t) (two slow sinusoids, a phase per pump) plus its own
noise; the temperatures follow the load of a minute before and report at a fifth of the rate.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Final

import msgspec
import numpy as np
import numpy.typing as npt

from ingest.errors import ConfigError

__all__ = ["FAULTS", "SENSORS", "SLOW", "Fault", "Pump", "pump_paths", "schedule"]

SLOW: Final = 5
"""The temperatures report at every SLOW-th sample time."""

# name: (unit, level, gain with the load, noise, slow)
SENSORS: Final[dict[str, tuple[str, float, float, float, bool]]] = {
    "flow": ("m3/h", 20.0, 80.0, 1.0, False),
    "pressure": ("bar", 3.0, 2.5, 0.05, False),
    "current": ("A", 8.0, 16.0, 0.3, False),
    "voltage": ("V", 402.0, -4.0, 0.8, False),
    "vibration": ("mm/s", 0.8, 1.2, 0.06, False),
    "temp.motor": ("degC", 38.0, 14.0, 0.25, True),
    "temp.bearing": ("degC", 36.0, 9.0, 0.25, True),
    "temp.fluid": ("degC", 22.0, 0.0, 0.1, True),
}

FAULTS: Final[dict[str, dict[str, float]]] = {
    # Each shift in units of the sensor's own noise: a joint pattern no single sensor shows.
    "cavitation": {"flow": -3.0, "pressure": -3.0, "vibration": 3.0, "current": -2.0},
    "valve": {"pressure": 3.0, "flow": -3.0, "current": -2.0},
    "bearing": {"vibration": 3.0, "temp.bearing": 3.0, "current": 1.5},
}


class Fault(msgspec.Struct, frozen=True):
    """A fault of `kind` on the pumps matching `device` (glob on the device path) over
    [start_us, end_us)."""

    kind: str
    device: str
    start_us: int
    end_us: int

    @staticmethod
    def parse(text: str, *, start_us: int) -> Fault:
        """`cavitation:plant9/pumps/*/pump-02@600+300`: KIND:DEVICE-GLOB@SECONDS+DURATION,
        seconds from the simulation's start."""
        try:
            kind, rest = text.split(":", 1)
            device, when = rest.rsplit("@", 1)
            at, _, duration = when.partition("+")
            if kind not in FAULTS or not device:
                raise ValueError
            begin = start_us + round(float(at) * 1e6)
            return Fault(kind, device, begin, begin + round(float(duration or "300") * 1e6))
        except ValueError:
            raise ConfigError(
                f"--fault {text!r}: expected KIND:DEVICE-GLOB@SECONDS[+DURATION] with KIND "
                f"{', '.join(FAULTS)}"
            ) from None


def pump_paths(n: int) -> list[str]:
    return [f"plant9/pumps/line1/pump-{i:02d}" for i in range(1, n + 1)]


class Pump:
    """One pump's sensor values; `values` is called with consecutive sample index ranges."""

    def __init__(self, path: str, seed: int, faults: tuple[Fault, ...] = ()) -> None:
        self.path = path
        self.faults = tuple(f for f in faults if fnmatch.fnmatchcase(path, f.device))
        self._rng = np.random.default_rng(seed)
        self._phase = self._rng.uniform(0, 2 * math.pi, 2)

    def load(self, t_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        p = self._phase
        out: npt.NDArray[np.float64] = (
            0.5
            + 0.2 * np.sin(2 * math.pi * t_s / 1500.0 + p[0])
            + 0.12 * np.sin(2 * math.pi * t_s / 410.0 + p[1])
        )
        return out

    def values(
        self, idx: npt.NDArray[np.int64], *, hz: float, start_us: int
    ) -> dict[str, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
        """Per sensor, (times µs, values) at the sample indices `idx`; the slow sensors only at
        the indices divisible by SLOW."""
        dt_us = round(1e6 / hz)
        t_s = idx / hz
        times = start_us + idx * dt_us
        u = self.load(t_s)
        lagged = self.load(t_s - 60.0)
        out = {}
        for name, (_, level, gain, noise, slow) in SENSORS.items():
            drive = lagged if name.startswith("temp.") else u
            v = level + gain * drive + noise * self._rng.standard_normal(len(idx))
            if name == "temp.fluid":
                v += 2.0 * np.sin(2 * math.pi * t_s / 3600.0)
            for f in self.faults:
                shift = FAULTS[f.kind].get(name)
                if shift:
                    v[(times >= f.start_us) & (times < f.end_us)] += shift * noise
            keep = (idx % SLOW == 0) if slow else np.ones(len(idx), np.bool_)
            out[name] = (times[keep], v[keep])
        return out


def schedule(
    paths: list[str], *, start_us: int, duration_s: float, seed: int, every_s: float = 1800.0
) -> list[Fault]:
    """Faults for a benchmark: per pump, about one per `every_s`, 2 to 10 minutes long, of a
    random kind, at random times, none in the first `every_s` (the baseline may go there)."""
    rng = np.random.default_rng(seed)
    out = []
    for path in paths:
        t = every_s
        while True:
            t += rng.uniform(0.5, 1.5) * every_s
            length = rng.uniform(120.0, 600.0)
            if t + length > duration_s:
                break
            kind = str(rng.choice(list(FAULTS)))
            begin = start_us + round(t * 1e6)
            out.append(Fault(kind, path, begin, begin + round(length * 1e6)))
            t += length
    return out
