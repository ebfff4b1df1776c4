"""Asset rules: which devices are scored against their asset-health model, and how offending
timestamps become events. Checked when the configuration loads; no numba here."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Final

import msgspec

from ingest.alerts.rules import AlertRule

__all__ = ["ANCHOR", "AssetRule", "asset_rule_for"]

ANCHOR: Final = "(asset)"
"""The pseudo-sensor of a device that its asset events are stored on: a name outside the wire
format's sensor names, so that no device can publish it."""


class AssetRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Asset health for the devices whose path matches `match` (fnmatch glob, case-sensitive,
    `*` also matches `/`; the first matching rule applies) and that have a model fitted by
    `ingest baseline`.

    - `hold_s`: a sensor's last value is carried forward at most this long; a device timestamp
      at which some model sensor has no value that recent is not scored.
    - `min_duration_s`: offending timestamps become an event once their run has lasted this
      long (last minus first offending time).
    - `gap_s`: offending timestamps at most this far apart are one run; an event ends at the
      first scored timestamp more than `gap_s` after its last offending one.
    - `alert`: the alert its events feed (`condition`, `severity`, delays as for an anomaly
      rule's alert).
    - `replay_s`: a flush holding readings at or before a device's newest scored timestamp
      (a late batch, or a device's sensors in separate messages) re-scores the device from a
      quiet timestamp (no run in progress) found at most this far before those readings.
      Readings more than `anomaly.replay_max_s` before the newest scored timestamp are stored
      but not scored.
    - `settle_s`: 0, or timestamps are scored only once the device has a reading this much
      newer, from its stored readings: the sensors of a timestamp that come in separate
      messages (Sparkplug report by exception, one message per sensor) are then scored
      together instead of re-scoring the device at most flushes.
    """

    match: str
    hold_s: float = 60.0
    min_duration_s: float = 30.0
    gap_s: float = 30.0
    replay_s: float = 600.0
    settle_s: float = 0.0
    alert: AlertRule | None = None
    """The alert the device's asset events feed: one condition per device (ingest/alerts)."""

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise ValueError(f"asset rule: match must be a non-empty glob, got {self.match!r}")
        if self.alert is not None and self.alert.kinds:
            raise ValueError(
                f"asset rule {self.match!r}: alert: kinds: an asset rule's alert takes its asset "
                "events; leave kinds out"
            )
        limits = {
            "hold_s": (1e-6, 86400.0),
            "min_duration_s": (0.0, 86400.0),
            "gap_s": (0.0, 86400.0),
            "replay_s": (0.0, 86400.0),
            "settle_s": (0.0, 3600.0),
        }
        for field, (low, high) in limits.items():
            got = getattr(self, field)
            if isinstance(got, bool) or not isinstance(got, int | float):
                raise ValueError(f"asset rule {self.match!r}: {field} must be a number")
            if not math.isfinite(got) or not low <= got <= high:
                raise ValueError(
                    f"asset rule {self.match!r}: {field} must be from {low:g} to {high:g} "
                    f"seconds, got {got!r}"
                )

    @property
    def hold_us(self) -> int:
        return round(self.hold_s * 1e6)

    @property
    def gap_us(self) -> int:
        return round(self.gap_s * 1e6)

    @property
    def min_us(self) -> int:
        return round(self.min_duration_s * 1e6)

    @property
    def replay_us(self) -> int:
        return round(self.replay_s * 1e6)

    @property
    def settle_us(self) -> int:
        return round(self.settle_s * 1e6)


def asset_rule_for(*, rules: Sequence[AssetRule], device: str) -> AssetRule | None:
    """The first rule whose glob matches the device path, or None."""
    for rule in rules:
        if fnmatch.fnmatchcase(device, rule.match):
            return rule
    return None
