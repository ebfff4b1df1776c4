"""Anomaly rules as the kernels take them: parameters per slot, the history a sensor's state is
restored from, and the words an event's detail is made of."""

from __future__ import annotations

import math

import msgspec

from ingest.anomaly.drift import DRIFT_SIZE
from ingest.anomaly.layout import AUTO, DRIFT, FLAT, RANGE, RATE, SPIKE
from ingest.anomaly.ranked import size as spike_size
from ingest.anomaly.rules import AUTO_DEFAULTS, AnomalyRule

__all__ = ["Compiled", "StateNeed", "compile_rule", "describe"]


class StateNeed(msgspec.Struct, frozen=True, kw_only=True):
    """History a sensor's state is rebuilt from: its last `readings` finite readings, and also
    every finite reading less than `span_us` before its latest one (`span_us` is 0 if unused).
    """

    readings: int
    span_us: int


class Compiled(msgspec.Struct, frozen=True):
    """A rule as the kernels take it (`ingest.anomaly.layout`: P_* ints, Q_* floats), the size of
    its pool area and the history it is restored from."""

    ints: tuple[int, ...]
    floats: tuple[float, ...]
    size: int
    need: StateNeed


def compile_rule(rule: AnomalyRule) -> Compiled:
    """The kernel parameters of `rule`: the layout's ints and floats, and the history it needs."""
    inf = math.inf
    mask = 0
    if rule.min is not None or rule.max is not None:
        mask |= 1 << RANGE
    if rule.max_rate is not None:
        mask |= 1 << RATE
    spike_w = rule.spike_window or 0
    if spike_w:
        mask |= 1 << SPIKE
    drift_w = rule.drift_window or 0
    drift_b = rule.drift_baseline or 0
    if drift_w:
        mask |= 1 << DRIFT
    flat_n = rule.flatline_count or 0
    flat_us = max(1, round(rule.flatline_seconds * 1e6)) if rule.flatline_seconds else 0
    if flat_n or flat_us:
        mask |= 1 << FLAT
    auto = rule.detector == "auto"
    d = AUTO_DEFAULTS
    auto_w = (rule.auto_window or d.auto_window) if auto else 0
    auto_r = (rule.auto_recent or d.auto_recent) if auto else 0
    auto_m = (rule.auto_min_readings or d.auto_min_readings) if auto else 0
    auto_g = (rule.auto_gap or d.auto_gap) if auto else 0
    if auto:
        mask |= 1 << AUTO
    hist = max(spike_w, drift_w + drift_b, auto_w)  # drift: the reading leaving the baseline too
    auto_at = spike_size(spike_w) + (DRIFT_SIZE if drift_w else 0)
    size = hist + auto_at + auto_w
    ints = (
        *(mask, spike_w, drift_w, drift_b, flat_n, flat_us, hist, 0, size),
        *(auto_w, auto_r, auto_m, auto_g, auto_at),
    )
    floats = (
        -inf if rule.min is None else float(rule.min),
        inf if rule.max is None else float(rule.max),
        inf if rule.max_rate is None else float(rule.max_rate),
        3.0 if rule.spike_threshold is None else float(rule.spike_threshold),
        float(rule.spike_min_sigma or 0.0),
        3.0 if rule.drift_sigma is None else float(rule.drift_sigma),
        float(rule.drift_min_sigma or 0.0),
        float(rule.auto_threshold or d.auto_threshold),
        float(rule.auto_shift_threshold or d.auto_shift_threshold),
        float(rule.auto_min_sigma or d.auto_min_sigma),
    )
    # auto: its window as of each of the last readings whose verdicts its run and gap recall
    readings = max(1, hist, flat_n - 1, auto_w + max(auto_m - 1, auto_g))
    need = StateNeed(readings=readings, span_us=flat_us if flat_us and not flat_n else 0)
    return Compiled(ints=ints, floats=floats, size=size, need=need)


def describe(kind: int, value: float, score: float, rule: AnomalyRule) -> str:
    """An event's `detail`: what its worst reading did, in the rule's terms."""
    if kind == RANGE:
        if rule.max is not None and value > rule.max:
            return f"above max {float(rule.max)!r}"
        return f"below min {float(rule.min or 0.0)!r}"
    if kind == RATE:
        return f"rate {score:.3g} x max_rate {float(rule.max_rate or 0.0)!r}/s"
    if kind == SPIKE:
        return f"{score:.3g} scaled MADs from the median of the last {rule.spike_window}"
    if kind == DRIFT:
        return (
            f"mean of the last {rule.drift_window} is {score:.3g} sd from "
            f"the {rule.drift_baseline} before"
        )
    if kind == AUTO:
        return (
            f"{score:.3g} x the threshold from the median of the last "
            f"{rule.auto_window or AUTO_DEFAULTS.auto_window}"
        )
    return f"unchanged for {score:g} s"
