"""The anomaly filters' plain-Python reference and the streams the property tests draw.

Each filter is a function of the whole history; events come from grouping its offending
readings. The kernels must match it exactly (`tests/test_anomaly.py`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

from hypothesis import strategies as st

from ingest.anomaly.layout import MAD_SCALE
from ingest.anomaly.rules import AUTO_DEFAULTS, AnomalyRule

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z
S = 1_000_000  # one second in microseconds

Reading = tuple[int, float]  # (time us, value)
Key = tuple[int, str, int]  # (sensor, kind, start)
Outcome = tuple[int | None, float, float]  # (end, value, score)


# ------------------------------------------------------------------------------------------
# The reference: each filter as a function of the whole history, then events by grouping
# ------------------------------------------------------------------------------------------


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    h = n // 2
    return ordered[h] if n % 2 else (ordered[h - 1] + ordered[h]) / 2.0


def _lanes(terms: Sequence[float]) -> float:
    """A window sum of a window holding a reading outside 2**-300..2**300 in magnitude (other
    than 0), as the rule defines it: eight lanes in time order, added pairwise."""
    s = [0.0] * 8
    for q, term in enumerate(terms):
        s[q % 8] += term
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


def _exact(window: Sequence[float]) -> bool:
    """Whether the rule takes the window's sums exactly (all its readings 0 or moderate)."""
    return all(v == 0.0 or 2.0**-300 <= abs(v) <= 2.0**300 for v in window)


def _mean(window: Sequence[float]) -> float:
    """The window's exact sum correctly rounded (math.fsum), over its length."""
    total = math.fsum(window) if _exact(window) else _lanes(window)
    return total / len(window)


def _sd(window: Sequence[float], mean: float) -> float:
    """sqrt(v / (n (n - 1))), v = n sum(x**2) - sum(x)**2 exactly, then correctly rounded;
    over a window with an extreme reading sqrt(sum((x - mean)**2) / (n - 1)) in eight lanes."""
    n = len(window)
    if _exact(window):
        spread = n * sum(Fraction(v) ** 2 for v in window) - sum(map(Fraction, window)) ** 2
        return math.sqrt(float(spread) / (n * (n - 1)))
    return math.sqrt(_lanes([(v - mean) * (v - mean) for v in window]) / (n - 1))


@dataclass
class _Open:
    start: int
    last: int
    value: float
    score: float


def _auto_verdicts(rule: AnomalyRule, vals: Sequence[float]) -> list[tuple[bool, float]]:
    """The auto detector's (offending, score) of each reading, as `AnomalyRule` defines it."""
    d = AUTO_DEFAULTS
    w = rule.auto_window or d.auto_window
    nr = rule.auto_recent or d.auto_recent
    k = rule.auto_threshold or d.auto_threshold
    kr = rule.auto_shift_threshold or d.auto_shift_threshold
    floor = rule.auto_min_sigma or d.auto_min_sigma
    out = []
    for i, x in enumerate(vals):
        if i < w:
            out.append((False, 0.0))
            continue
        window = sorted(vals[i - w : i])
        med = _median(window)
        sigma = max(MAD_SCALE * _median(sorted(abs(v - med) for v in window)), floor)
        steps = [b - a for a, b in itertools.pairwise(window) if b - a > 0.0]
        sigma = max(sigma, min(steps, default=0.0))
        total = 0.0
        for v in vals[i - nr + 1 : i + 1]:
            total += v
        dev, dr = abs(x - med), abs(total / nr - med)
        score = max(_over(dev, k * sigma), _over(dr, kr * sigma))
        out.append((score > 1.0, score))
    return out


def _over(d: float, limit: float) -> float:
    if limit > 0.0:
        return d / limit
    return math.inf if d > 0.0 else 0.0


def _auto_events(
    sensor: int, rule: AnomalyRule, times: Sequence[int], vals: Sequence[float]
) -> dict[Key, Outcome]:
    """Events of the auto detector: M consecutive offending readings open one (from the first
    of them), G consecutive quiet ones end it (at its last offending reading)."""
    need = rule.auto_min_readings or AUTO_DEFAULTS.auto_min_readings
    gap = rule.auto_gap or AUTO_DEFAULTS.auto_gap
    out: dict[Key, Outcome] = {}
    run: list[int] = []  # the offending run not yet an event
    ev: _Open | None = None
    quiet = 0
    verdicts = _auto_verdicts(rule, vals)
    for i, (bad, score) in enumerate(verdicts):
        if bad:
            quiet = 0
            run.append(i)
            if ev is not None:
                if score > ev.score:
                    ev.score, ev.value = score, vals[i]
                ev.last = times[i]
            elif len(run) >= need:
                worst = run[0]
                for j in run:
                    if verdicts[j][1] > verdicts[worst][1]:
                        worst = j
                ev = _Open(times[run[0]], times[i], vals[worst], verdicts[worst][1])
        else:
            run = []
            if ev is not None:
                quiet += 1
                if quiet >= gap:
                    out[(sensor, "auto", ev.start)] = (ev.last, ev.value, ev.score)
                    ev, quiet = None, 0
    if ev is not None:
        out[(sensor, "auto", ev.start)] = (None, ev.value, ev.score)
    return out


def reference_events(
    sensor: int, rule: AnomalyRule, readings: Iterable[Reading]
) -> dict[Key, Outcome]:
    """Events of one sensor whose accepted readings (time order) are `readings`."""
    points = [(t, v) for t, v in readings if math.isfinite(v)]
    times = [t for t, _ in points]
    vals = [v for _, v in points]
    lo = -math.inf if rule.min is None else rule.min
    hi = math.inf if rule.max is None else rule.max
    spike_k = 3.0 if rule.spike_threshold is None else rule.spike_threshold
    drift_k = 3.0 if rule.drift_sigma is None else rule.drift_sigma
    flat_us = max(1, round(rule.flatline_seconds * 1e6)) if rule.flatline_seconds else 0
    run = 0
    opened: dict[str, _Open] = {}
    out: dict[Key, Outcome] = {}
    for i, (t, x) in enumerate(points):
        # kind -> (offending, score, value, start)
        verdict: dict[str, tuple[bool, float, float, int]] = {}
        if rule.min is not None or rule.max is not None:
            if x > hi:
                verdict["range"] = (True, x - hi, x, t)
            elif x < lo:
                verdict["range"] = (True, lo - x, x, t)
            else:
                verdict["range"] = (False, 0.0, x, t)
        if rule.max_rate is not None:
            bad, score = False, 0.0
            if i >= 1:
                rate = abs(x - vals[i - 1]) / (float(t - times[i - 1]) / 1e6)
                bad, score = rate > rule.max_rate, rate / rule.max_rate
            verdict["rate"] = (bad, score, x, t)
        if rule.spike_window is not None:
            w = rule.spike_window
            bad, score = False, 0.0
            if i >= w:
                window = sorted(vals[i - w : i])
                med = _median(window)
                mad = _median(sorted(abs(v - med) for v in window))
                sigma = MAD_SCALE * mad
                floor = rule.spike_min_sigma or 0.0
                if sigma < floor:
                    sigma = floor
                dev = abs(x - med)
                bad = dev > spike_k * sigma
                score = dev / sigma if sigma > 0 else math.inf
            verdict["spike"] = (bad, score, x, t)
        if rule.drift_window is not None and rule.drift_baseline is not None:
            wd, wb = rule.drift_window, rule.drift_baseline
            bad, score, mean_r = False, 0.0, 0.0
            if i >= wd - 1 + wb:
                base = vals[i - wd + 1 - wb : i - wd + 1]
                recent = vals[i - wd + 1 : i + 1]
                mean_b = _mean(base)
                sd = _sd(base, mean_b)
                mean_r = _mean(recent)
                floor = rule.drift_min_sigma or 0.0
                if sd < floor:
                    sd = floor
                dist = abs(mean_r - mean_b)
                bad = dist > drift_k * sd
                score = dist / sd if sd > 0 else math.inf
            verdict["drift"] = (bad, score, mean_r, t)
        if rule.flatline_count is not None or rule.flatline_seconds is not None:
            if i == 0 or x != vals[i - 1]:
                run = i
            count, dur = i - run + 1, t - times[run]
            bad = (rule.flatline_count is not None and count >= rule.flatline_count) or (
                flat_us > 0 and dur >= flat_us
            )
            verdict["flatline"] = (bad, dur / 1e6, x, times[run])
        for kind, (bad, score, value, start) in verdict.items():
            ev = opened.get(kind)
            if bad:
                if ev is None:
                    opened[kind] = _Open(start, t, value, score)
                else:
                    if score > ev.score:
                        ev.score, ev.value = score, value
                    ev.last = t
            elif ev is not None:
                out[(sensor, kind, ev.start)] = (ev.last, ev.value, ev.score)
                del opened[kind]
    for kind, ev in opened.items():
        out[(sensor, kind, ev.start)] = (None, ev.value, ev.score)
    if rule.detector == "auto":
        out.update(_auto_events(sensor, rule, times, vals))
    return out


# ------------------------------------------------------------------------------------------
# Driving the detector like the pipeline does
# ------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------


@st.composite
def rules(draw: st.DrawFn) -> AnomalyRule:
    kw: dict[str, float | int | str] = {}
    if draw(st.booleans()):
        kw["min"] = draw(st.sampled_from([-5.0, 0.0, 1.0]))
    if draw(st.booleans()):
        kw["max"] = float(kw.get("min", -2.0)) + draw(st.sampled_from([0.0, 3.0, 12.0]))
    if draw(st.booleans()):
        kw["max_rate"] = draw(st.sampled_from([0.5, 2.0, 8.0]))
    if draw(st.booleans()):
        kw["spike_window"] = draw(st.integers(3, 7))
        if draw(st.booleans()):
            kw["spike_threshold"] = draw(st.sampled_from([0.5, 2.0, 3.0]))
        if draw(st.booleans()):
            kw["spike_min_sigma"] = draw(st.sampled_from([0.0, 0.3, 2.0]))
    if draw(st.booleans()):
        kw["drift_window"] = draw(st.integers(1, 4))
        kw["drift_baseline"] = draw(st.integers(2, 5))
        if draw(st.booleans()):
            kw["drift_sigma"] = draw(st.sampled_from([0.5, 1.0, 3.0]))
        if draw(st.booleans()):
            kw["drift_min_sigma"] = draw(st.sampled_from([0.0, 0.5]))
    if draw(st.booleans()):
        kw["flatline_count"] = draw(st.integers(2, 5))
    if draw(st.booleans()):
        kw["flatline_seconds"] = draw(st.sampled_from([0.5, 2.0, 3.5]))
    if draw(st.booleans()):
        kw["detector"] = "auto"
        kw["auto_window"] = draw(st.integers(8, 10))
        kw["auto_recent"] = draw(st.integers(1, 3))
        kw["auto_min_readings"] = draw(st.integers(1, 3))
        kw["auto_gap"] = draw(st.integers(1, 4))
        kw["auto_threshold"] = draw(st.sampled_from([0.5, 2.0, 4.0]))
        kw["auto_shift_threshold"] = draw(st.sampled_from([0.5, 2.0]))
        if draw(st.booleans()):
            kw["auto_min_sigma"] = draw(st.sampled_from([0.0, 0.3]))
    if not kw:
        kw["max"] = 4.0
    return AnomalyRule(match="*", **kw)  # type: ignore[arg-type]


values = st.one_of(
    st.sampled_from([0.0, 1.0, 1.0, 2.0, 5.0, -3.0, 20.0]),
    st.floats(-30.0, 30.0),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.sampled_from([1e-310, -(2.0**-301), 2.0**-300, 2.0**300, -(2.0**301), 1e300]),
)
gaps = st.sampled_from([1, 250_000, S, S, 3 * S])


@st.composite
def streams(draw: st.DrawFn, *, max_len: int = 40, repeat: int = 4) -> list[Reading]:
    """One sensor's readings, in time order; about one in `repeat` repeats the previous value."""
    n = draw(st.integers(0, max_len))
    t = T0 + draw(st.integers(0, 10 * S))
    out: list[Reading] = []
    for _ in range(n):
        t += draw(gaps)
        same = out and draw(st.integers(1, repeat)) == 1  # runs of equal values (flatlines)
        out.append((t, out[-1][1] if same else draw(values)))
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[int, AnomalyRule | None], dict[int, list[Reading]]]:
    sensors = draw(
        st.lists(st.sampled_from([0, 1, 7, 40, 1000]), min_size=1, max_size=4, unique=True)
    )
    rule_map = {s: draw(st.one_of(st.none(), rules()) if s == 40 else rules()) for s in sensors}
    return rule_map, {s: draw(streams()) for s in sensors}
