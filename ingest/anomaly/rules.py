"""Anomaly rules: which filters apply to which sensors, checked when the configuration loads.

Kept apart from the kernels (`ingest.anomaly.detector`) so that reading a configuration does
not load numba.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

import msgspec

from ingest.alerts.rules import AlertRule

__all__ = [
    "AUTO_DEFAULTS",
    "MAX_DRIFT_SPAN",
    "MAX_SPIKE_WINDOW",
    "AnomalyRule",
    "AutoDefaults",
    "rule_for",
]

MAX_SPIKE_WINDOW: Final = 36_000
"""Upper bound of spike_window (an hour at 10 Hz): each sensor keeps the window twice, as
readings and in rank order, and restores it at a start."""


class AutoDefaults(msgspec.Struct, frozen=True, kw_only=True):
    """The `detector = "auto"` preset: each `auto_*` key a rule leaves unset takes this value."""

    auto_window: int = 256
    auto_threshold: float = 4.0
    auto_recent: int = 4
    auto_shift_threshold: float = 2.0
    auto_min_readings: int = 2
    auto_gap: int = 64
    auto_min_sigma: float = 0.0


AUTO_DEFAULTS: Final = AutoDefaults()
MAX_DRIFT_SPAN: Final = 100_000
"""Upper bound of drift_window + drift_baseline (a day at 1 Hz; an hour at 10 Hz is 36,000):
each sensor keeps that many readings, 8 bytes each, and restores them at a start."""


class AnomalyRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Anomaly filters for the sensors whose "device/sensor" path matches `match`.

    `match` is an fnmatch glob (case-sensitive; `*` also matches `/`); the first matching rule
    of the configuration applies (`rule_for`). Each filter is optional; at least one is set.
    A filter judges each finite reading x_i at time t_i (i counts a sensor's finite readings in
    time order); a run of consecutive offending readings is one event. Exactly:

    - range (`min`, `max`): offends if x_i > max (score x_i - max) or x_i < min (min - x_i).
    - rate (`max_rate`, units/s): r_i = |x_i - x_i-1| / (t_i - t_i-1 in s) > max_rate;
      score r_i / max_rate. Not judged on a sensor's first reading.
    - spike (`spike_window` W, `spike_threshold` k = 3, `spike_min_sigma` f = 0; Hampel): over
      the W readings before x_i, m = median and s = max(1.4826 * median |x_j - m|, f); offends
      if |x_i - m| > k * s; score |x_i - m| / s (inf if s = 0). Judged from reading W + 1 on.
    - drift (`drift_window` D, `drift_baseline` B, `drift_sigma` k = 3, `drift_min_sigma`
      f = 0): r = mean of the last D readings (x_i included); over the B readings before
      those, b = mean and s = max(sample standard deviation, f); offends if |r - b| > k * s;
      score |r - b| / s (inf if s = 0), value r. Judged from reading D + B on.
    - flatline (`flatline_count` N, `flatline_seconds` T): the run is x_i and the readings
      equal to it (==) right before it; offends if the run holds >= N readings or lasts
      >= T (rounded to whole microseconds) from its first reading; either limit suffices. The
      event starts at the run's first reading; score is the run's duration in seconds.
    - auto (`detector = "auto"`; `auto_window` B = 256, `auto_threshold` k = 4, `auto_recent`
      R = 4, `auto_shift_threshold` kr = 2, `auto_min_readings` M = 2, `auto_gap` G = 64,
      `auto_min_sigma` f = 0): over the B readings before x_i, m = median and
      s = max(1.4826 * median |x_j - m|, q, f), where q is the smallest non-zero difference
      between two of them (the sensor's resolution; 0 if they are all equal); r = mean of the
      last R readings (x_i included), their sum taken in time order from 0.0. Score
      max(|x_i - m| / (k s), |r - m| / (kr s)), a term inf where its divisor (as rounded)
      is 0 and its deviation is not (0 where neither); x_i offends if the score is > 1. Judged
      from reading B + 1 on (the learning period). An event opens once M consecutive
      readings offend and starts at the first of them; it ends at its last offending reading
      once G consecutive readings have not offended, so that offending runs less than G
      readings apart are one event. Value x_i.

    `detector = "auto"` may be combined with explicit filters: each filter judges the readings
    on its own and its events have its own kind (`auto` for the preset's).

    A median of an even count is the mean of the middle two. A window's mean is its exact sum
    correctly rounded to a double (what `math.fsum` returns) over its length; the baseline's
    sample variance is v / (B (B - 1)) with v = B sum(x_j**2) - sum(x_j)**2 computed exactly,
    then correctly rounded, and its sample standard deviation the square root of that. So
    every statistic is a function of its window alone, bit for bit, however the stream was
    cut, at the same cost per reading whatever the window's length. A window holding a
    reading outside 2**-300..2**300 in magnitude (other than 0) is summed in eight lanes
    instead, lane r taking the window's readings r, r + 8, ... in time order from 0.0, giving
    ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7)), and its variance is the lane sum of
    (x_j - b)**2 over (B - 1).
    """

    match: str
    min: float | None = None
    max: float | None = None
    max_rate: float | None = None
    spike_window: int | None = None
    spike_threshold: float | None = None
    spike_min_sigma: float | None = None
    drift_window: int | None = None
    drift_baseline: int | None = None
    drift_sigma: float | None = None
    drift_min_sigma: float | None = None
    flatline_count: int | None = None
    flatline_seconds: float | None = None
    detector: str | None = None
    auto_window: int | None = None
    auto_threshold: float | None = None
    auto_recent: int | None = None
    auto_shift_threshold: float | None = None
    auto_min_readings: int | None = None
    auto_gap: int | None = None
    auto_min_sigma: float | None = None
    alert: AlertRule | None = None  # the alert these events feed (ingest/alerts)

    def __post_init__(self) -> None:
        """Check every field; raise ValueError naming the rule and the field."""
        _validate(self)


def _validate(rule: AnomalyRule) -> None:
    def fail(field: str, need: str) -> NoReturn:
        got = getattr(rule, field)
        raise ValueError(f"anomaly rule {rule.match!r}: {field} must be {need}, got {got!r}")

    def number(field: str, need: str, ok: Callable[[float], bool]) -> None:
        got = getattr(rule, field)
        if got is None:
            return
        if isinstance(got, bool) or not isinstance(got, int | float):
            fail(field, need)
        if not math.isfinite(got) or not ok(float(got)):
            fail(field, need)

    def integer(field: str, low: int, high: int) -> None:
        got = getattr(rule, field)
        if got is None:
            return
        if isinstance(got, bool) or not isinstance(got, int) or not low <= got <= high:
            fail(field, f"an integer from {low} to {high}")

    def needs(field: str, base: str) -> None:
        if getattr(rule, field) is not None and getattr(rule, base) is None:
            raise ValueError(f"anomaly rule {rule.match!r}: {field} is set but {base} is not")

    if not isinstance(rule.match, str) or not rule.match:
        raise ValueError(f"anomaly rule: match must be a non-empty glob, got {rule.match!r}")
    number("min", "a finite number", lambda _: True)
    number("max", "a finite number", lambda _: True)
    if rule.min is not None and rule.max is not None and rule.min > rule.max:
        raise ValueError(f"anomaly rule {rule.match!r}: min {rule.min} is above max {rule.max}")
    number("max_rate", "a finite number > 0", lambda x: x > 0)
    integer("spike_window", 3, MAX_SPIKE_WINDOW)
    number("spike_threshold", "a finite number > 0", lambda x: x > 0)
    number("spike_min_sigma", "a finite number >= 0", lambda x: x >= 0)
    needs("spike_threshold", "spike_window")
    needs("spike_min_sigma", "spike_window")
    integer("drift_window", 1, MAX_DRIFT_SPAN - 2)
    integer("drift_baseline", 2, MAX_DRIFT_SPAN - 1)
    needs("drift_window", "drift_baseline")
    needs("drift_baseline", "drift_window")
    drift_w, drift_b = rule.drift_window, rule.drift_baseline
    if drift_w is not None and drift_b is not None and drift_w + drift_b > MAX_DRIFT_SPAN:
        fail("drift_baseline", f"at most {MAX_DRIFT_SPAN} - drift_window")
    number("drift_sigma", "a finite number > 0", lambda x: x > 0)
    number("drift_min_sigma", "a finite number >= 0", lambda x: x >= 0)
    needs("drift_sigma", "drift_window")
    needs("drift_min_sigma", "drift_window")
    integer("flatline_count", 2, 2**62)
    number("flatline_seconds", "a number of seconds from 1e-6 to 1e9", lambda x: 1e-6 <= x <= 1e9)
    if rule.detector is not None and rule.detector != "auto":
        fail("detector", '"auto"')
    integer("auto_window", 8, MAX_SPIKE_WINDOW)
    number("auto_threshold", "a finite number > 0", lambda x: x > 0)
    integer("auto_recent", 1, MAX_SPIKE_WINDOW)
    number("auto_shift_threshold", "a finite number > 0", lambda x: x > 0)
    integer("auto_min_readings", 1, MAX_SPIKE_WINDOW)
    integer("auto_gap", 1, MAX_SPIKE_WINDOW)
    number("auto_min_sigma", "a finite number >= 0", lambda x: x >= 0)
    for field in AutoDefaults.__struct_fields__:
        needs(field, "detector")
    window = rule.auto_window or AUTO_DEFAULTS.auto_window
    if rule.auto_recent is not None and rule.auto_recent > window:
        fail("auto_recent", f"at most auto_window ({window})")
    filters = ("min", "max", "max_rate", "spike_window", "drift_window", "flatline_count")
    if all(getattr(rule, f) is None for f in (*filters, "flatline_seconds", "detector")):
        raise ValueError(f"anomaly rule {rule.match!r}: sets no filter")


def rule_for(*, rules: Sequence[AnomalyRule], path: str) -> AnomalyRule | None:
    """The first rule whose `match` glob matches `path` ("device/sensor"), or None."""
    for rule in rules:
        if fnmatch.fnmatchcase(path, rule.match):
            return rule
    return None
