"""Anomaly detection quality on real labelled data: NAB `realKnownCause`, scored per window.

    python -m benchmarks.anomaly_quality [--data ../shared/data/nab] [--per-file]

Each series goes through the product's own path: its samples are encoded as wire-format
MessagePack batches (one message per `--batch` readings), decoded by `decode_batch`, and run
through the anomaly kernels (`AnomalyDetector`) flush by flush, as `ingest run` does. An event is
one detection at its start time. Scored as NAB counts windows: a window with at least one
detection inside it is detected (further detections in it are not counted), a detection outside
every window is a false detection; false detections are given per sensor-day of data.

The configurations are the ones a user would write after reading the README, one rule for every
sensor (`match = "*"`), nothing tuned per file: the adaptive detector's defaults
(`detector = "auto"`), the same with one default moved each way, and the explicit filters.
Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import numpy as np
import numpy.typing as npt

from benchmarks import quality_sim
from ingest.anomaly.detector import AnomalyDetector, Event
from ingest.anomaly.rules import AnomalyRule
from ingest.decode import DecodeLimits, decode_batch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "nab"
DAY_US = 86_400_000_000

CONFIGS: dict[str, AnomalyRule] = {
    "auto (defaults)": AnomalyRule(match="*", detector="auto"),
    "auto, window 128": AnomalyRule(match="*", detector="auto", auto_window=128),
    "auto, window 512": AnomalyRule(match="*", detector="auto", auto_window=512),
    "auto, k = 5, kr = 2.5": AnomalyRule(
        match="*", detector="auto", auto_threshold=5.0, auto_shift_threshold=2.5
    ),
    "auto, gap 16": AnomalyRule(match="*", detector="auto", auto_gap=16),
    "auto, min 1 reading": AnomalyRule(match="*", detector="auto", auto_min_readings=1),
    "spike 60 k=5 + drift 20/200 4σ": AnomalyRule(
        match="*",
        spike_window=60,
        spike_threshold=5.0,
        drift_window=20,
        drift_baseline=200,
        drift_sigma=4.0,
    ),
    "drift 12/288 5σ": AnomalyRule(match="*", drift_window=12, drift_baseline=288, drift_sigma=5.0),
    "spike 60 k=5": AnomalyRule(match="*", spike_window=60, spike_threshold=5.0),
    "drift 20/200 4σ": AnomalyRule(match="*", drift_window=20, drift_baseline=200, drift_sigma=4.0),
}

# Published NAB standard scores on the whole benchmark (58 files; 100 perfect, 0 the null
# detector), from the data's README: a different measure, printed for orientation only.
PUBLISHED = (
    ("ARTime", 74.9),
    ("Numenta HTM", 70.1),
    ("contextOSE", 69.9),
    ("KNN CAD", 58.0),
    ("random cut forest", 51.7),
    ("random", 16.8),
)

TARGET_WINDOWS = 16
TARGET_FALSE_PER_DAY = 0.2


@dataclass(frozen=True)
class Series:
    name: str
    time: npt.NDArray[np.int64]  # microseconds since the epoch, UTC
    value: npt.NDArray[np.float64]
    windows: tuple[tuple[int, int], ...]

    @property
    def days(self) -> float:
        return float(self.time[-1] - self.time[0]) / DAY_US


@dataclass(frozen=True)
class Score:
    windows: int
    detected: int
    false: int
    days: float
    events: int

    def __add__(self, other: Score) -> Score:
        return Score(
            self.windows + other.windows,
            self.detected + other.detected,
            self.false + other.false,
            self.days + other.days,
            self.events + other.events,
        )

    @property
    def false_per_day(self) -> float:
        return self.false / self.days if self.days else 0.0


def _us(text: str) -> int:
    """Microseconds since the epoch of a NAB time stamp (UTC, written without a zone)."""
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def load(data: Path) -> list[Series]:
    labels = json.loads((data / "windows.json").read_text(encoding="utf-8"))
    out = []
    for key in sorted(labels):
        with (data / key).open(encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        time = np.array([_us(r["timestamp"]) for r in rows], np.int64)
        value = np.array([float(r["value"]) for r in rows], np.float64)
        # A few files repeat a time stamp; the service stores one reading per (sensor, time),
        # the first one it commits, so keep the first of each in time order.
        order = np.argsort(time, kind="stable")
        time, value = time[order], value[order]
        keep = np.ones(time.shape[0], np.bool_)
        keep[1:] = time[1:] != time[:-1]
        out.append(
            Series(
                name=Path(key).stem,
                time=time[keep],
                value=value[keep],
                windows=tuple((_us(a), _us(b)) for a, b in labels[key]),
            )
        )
    return out


def payloads(series: Series, batch: int) -> list[bytes]:
    """The series as wire-format v1 MessagePack messages of `batch` readings each."""
    encoder = msgspec.msgpack.Encoder()
    out = []
    for at in range(0, series.time.shape[0], batch):
        t = series.time[at : at + batch]
        v = series.value[at : at + batch]
        out.append(
            encoder.encode(
                {
                    "v": 1,
                    "t0": int(t[0]),
                    "ch": [
                        {
                            "s": "value",
                            "t": (t - t[0]).astype("<i8").tobytes(),
                            "v": v.astype("<f8").tobytes(),
                        }
                    ],
                }
            )
        )
    return out


def detect(series: Series, rule: AnomalyRule, batch: int) -> list[Event]:
    """The events `ingest run` stores for this series under `rule`, final state of each."""
    limits = DecodeLimits(min_time_us=1)
    now_us = int(series.time[-1]) + DAY_US
    detector = AnomalyDetector()
    detector.assign(sensor_id=0, rule=rule)
    events: dict[tuple[str, int], Event] = {}
    for payload in payloads(series, batch):
        decoded = decode_batch(
            payload, content_type="application/msgpack", limits=limits, now_us=now_us
        )
        sensor = np.zeros(decoded.readings, np.int32)
        pending = detector.process(sensor=sensor, time=decoded.time, value=decoded.value)
        detector.commit(pending)
        for ev in pending.events:
            events[(ev.kind, ev.start)] = ev
    return sorted(events.values(), key=lambda e: e.start)


def score(series: Series, events: Sequence[Event]) -> Score:
    hit = [False] * len(series.windows)
    false = 0
    for ev in events:
        inside = [i for i, (a, b) in enumerate(series.windows) if a <= ev.start <= b]
        if inside:
            for i in inside:
                hit[i] = True
        else:
            false += 1
    return Score(len(series.windows), sum(hit), false, series.days, len(events))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.anomaly_quality",
        description="Anomaly detection quality on NAB realKnownCause, through decode and kernels.",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the NAB folder")
    p.add_argument("--batch", type=int, default=100, help="readings per message (default 100)")
    p.add_argument("--per-file", action="store_true", help="also print each file's figures")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not (args.data / "windows.json").is_file():
        print(f"anomaly_quality: no NAB data at {args.data} (windows.json)", file=sys.stderr)
        return 2
    if args.batch < 1:
        print("anomaly_quality: --batch must be at least 1", file=sys.stderr)
        return 2
    series = load(args.data)
    days = sum(s.days for s in series)
    windows = sum(len(s.windows) for s in series)
    print(
        f"NAB realKnownCause: {len(series)} series, {windows} labelled windows, "
        f"{days:.1f} sensor-days, {sum(s.time.shape[0] for s in series):,} readings"
    )
    print(
        f"target (defaults, nothing tuned per file): >= {TARGET_WINDOWS} of {windows} windows, "
        f"<= {TARGET_FALSE_PER_DAY} false detections per sensor-day\n"
    )
    width = max(*(len(name) for name in CONFIGS), *(len(s.name) + 2 for s in series))
    print(f"{'configuration':<{width}}  windows  false/day  events")
    for name, rule in CONFIGS.items():
        total = Score(0, 0, 0, 0.0, 0)
        lines = []
        for s in series:
            one = score(s, detect(s, rule, args.batch))
            total = total + one
            lines.append(
                f"  {s.name:<{width - 2}}  {one.detected:>3}/{one.windows:<3}  "
                f"{one.false_per_day:>9.2f}  {one.events:>6}"
            )
        print(
            f"{name:<{width}}  {total.detected:>3}/{total.windows:<3}  "
            f"{total.false_per_day:>9.2f}  {total.events:>6}"
        )
        if args.per_file:
            print("\n".join(lines))
    print("\npublished NAB standard scores, whole benchmark (another measure, for orientation):")
    print(", ".join(f"{name} {value}" for name, value in PUBLISHED))
    print()
    return quality_sim.main([])  # the simulated plant's multi-sensor faults


if __name__ == "__main__":
    sys.exit(main())
