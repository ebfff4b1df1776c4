"""Alert settings: the alert an anomaly rule may carry, the `[alerts]` section and its sinks.

Kept free of the database and network code, so that reading a configuration loads neither.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Final, Literal

import msgspec

__all__ = [
    "SEVERITIES",
    "AlertRule",
    "Alerts",
    "CloudEventsSink",
    "MqttSink",
    "PagerDutySink",
    "ServiceNowSink",
    "SinkConfig",
    "rank",
    "sink_wants",
]

SEVERITIES: Final = ("info", "warning", "minor", "major", "critical")
"""Severity names, least to most severe; priority = rank (1-5) x the asset's criticality (1-5)."""

KINDS: Final = ("range", "rate", "spike", "drift", "flatline", "auto")
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

Severity = Literal["info", "warning", "minor", "major", "critical"]


def rank(severity: str) -> int:
    """1 (info) to 5 (critical)."""
    return SEVERITIES.index(severity) + 1


class AlertRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The alert of an anomaly rule: its events on a device's matching sensors are one condition.

    One alert per (device, condition); several rules may feed one condition (the most severe
    active event gives the severity). Delays are in data time (the readings' clock).
    """

    condition: str
    severity: Severity = "warning"
    on_delay_s: float = 0.0
    off_delay_s: float = 0.0
    flap_count: int = 0
    flap_window_s: float = 0.0
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.condition, str) or not _NAME.fullmatch(self.condition):
            raise ValueError(
                f"alert condition {self.condition!r}: must be 1-64 characters from "
                "A-Z a-z 0-9 _ . : -"
            )
        where = f"alert {self.condition!r}"
        for field in ("on_delay_s", "off_delay_s", "flap_window_s"):
            if not 0 <= getattr(self, field) <= 1e7:
                raise ValueError(f"{where}: {field} must be from 0 to 1e7 seconds")
        if self.flap_count and not 2 <= self.flap_count <= 1000:
            raise ValueError(f"{where}: flap_count must be 0 (off) or from 2 to 1000")
        if self.flap_count and self.flap_window_s <= 0:
            raise ValueError(f"{where}: flap_window_s must be > 0 when flap_count is set")
        for kind in self.kinds:
            if kind not in KINDS:
                raise ValueError(f"{where}: kinds: {kind!r} is not one of {', '.join(KINDS)}")


class _Sink(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str
    match: str = "*"
    """Glob on "<device path>/<condition>": which alerts this sink gets."""
    min_severity: Severity = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ValueError(
                f"sink name {self.name!r}: must be 1-64 characters A-Z a-z 0-9 _ . : -"
            )


class CloudEventsSink(_Sink, frozen=True, tag="cloudevents", tag_field="type"):
    """CloudEvents 1.0, structured JSON, POSTed to `url`."""

    url: str
    source: str = "/ingest/alerts"
    type_prefix: str = "io.ingest.alert"
    headers: dict[str, str] = {}


class ServiceNowSink(_Sink, frozen=True, tag="servicenow", tag_field="type"):
    """ServiceNow Event Management: POST <instance>/api/global/em/jsonv2 with basic auth."""

    url: str
    username: str = ""
    password: str = ""
    source: str = "ingest"


class PagerDutySink(_Sink, frozen=True, tag="pagerduty", tag_field="type"):
    """PagerDuty Events API v2: trigger and resolve with the alert key as dedup_key."""

    routing_key: str
    url: str = "https://events.pagerduty.com/v2/enqueue"


class MqttSink(_Sink, frozen=True, tag="mqtt", tag_field="type"):
    """Retained MQTT messages: `<topic_prefix>/<asset path>/<device>/<condition>`, QoS 1."""

    url: str
    topic_prefix: str = "alerts"
    client_id: str = ""


SinkConfig = CloudEventsSink | ServiceNowSink | PagerDutySink | MqttSink


class Alerts(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[alerts]: lifecycle evaluation, silence, the outbox dispatcher and the sinks."""

    enabled: bool = True
    evaluate_interval_s: float = 1.0
    lookback_s: float = 86_400.0
    silence_s: float = 0.0
    silence_match: str = "*"
    silence_condition: str = "silence"
    silence_severity: Severity = "major"
    poll_interval_s: float = 5.0
    batch: int = 50
    timeout_s: float = 10.0
    max_attempts: int = 10
    retry_min_s: float = 1.0
    retry_max_s: float = 300.0
    sinks: tuple[SinkConfig, ...] = ()

    def __post_init__(self) -> None:
        for field in ("evaluate_interval_s", "poll_interval_s", "timeout_s", "retry_min_s"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field}: must be > 0")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s: must be >= retry_min_s")
        if self.lookback_s < 60:
            raise ValueError("lookback_s: must be >= 60")
        if self.silence_s < 0:
            raise ValueError("silence_s: must be >= 0 (0: off)")
        if not _NAME.fullmatch(self.silence_condition):
            raise ValueError("silence_condition: must be 1-64 characters A-Z a-z 0-9 _ . : -")
        if not 1 <= self.batch <= 1000:
            raise ValueError("batch: must be from 1 to 1000")
        if not 1 <= self.max_attempts <= 1000:
            raise ValueError("max_attempts: must be from 1 to 1000")
        names = [s.name for s in self.sinks]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"sinks: the name {name!r} is used twice")
        for sink in self.sinks:
            if isinstance(sink, MqttSink):
                if not re.match(r"^mqtts?://", sink.url):
                    raise ValueError(f"sinks: {sink.name}: url must start with mqtt://")
            elif not re.match(r"^https?://", sink.url):
                raise ValueError(f"sinks: {sink.name}: url must start with http:// or https://")


def sink_wants(sink: SinkConfig, *, device: str, condition: str, severity: str) -> bool:
    """Whether `sink` gets the notifications of this alert."""
    return rank(severity) >= rank(sink.min_severity) and fnmatch.fnmatchcase(
        f"{device}/{condition}", sink.match
    )
