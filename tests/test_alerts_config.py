"""Alert settings: rules carried by anomaly rules, [alerts], sinks, and their errors."""

from __future__ import annotations

import json

import pytest

from ingest import config
from ingest.alerts.rules import CloudEventsSink, MqttSink, ServiceNowSink, sink_wants
from ingest.errors import ConfigError
from tests.support.ingester import ingest_cli

BASE = {"INGEST_DB_URL": "postgresql://ingest@db/telemetry"}


def test_an_anomaly_rule_carries_an_alert_and_sinks_come_from_json() -> None:
    env = {
        **BASE,
        "INGEST_ANOMALY_RULES": json.dumps(
            [
                {
                    "match": "*/temp",
                    "max": 90,
                    "alert": {"condition": "overheating", "severity": "major", "on_delay_s": 5},
                }
            ]
        ),
        "INGEST_ALERTS_SINKS": json.dumps(
            [
                {"type": "cloudevents", "name": "hook", "url": "https://h.example/x"},
                {
                    "type": "servicenow",
                    "name": "itsm",
                    "url": "https://i.example",
                    "username": "u",
                    "password": "p",
                },
                {"type": "mqtt", "name": "broker", "url": "mqtt://b:1883", "match": "plant1/*"},
            ]
        ),
    }
    cfg = config.load(env=env)
    [rule] = cfg.anomaly.rules
    assert rule.alert is not None
    assert (rule.alert.condition, rule.alert.severity, rule.alert.on_delay_s) == (
        "overheating",
        "major",
        5.0,
    )
    assert [type(s) for s in cfg.alerts.sinks] == [CloudEventsSink, ServiceNowSink, MqttSink]
    broker = cfg.alerts.sinks[2]
    assert sink_wants(broker, device="plant1/a/l/d", condition="c", severity="info")
    assert not sink_wants(broker, device="plant2/a/l/d", condition="c", severity="info")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {
                "INGEST_ANOMALY_RULES": '[{"match": "*", "max": 1, "alert": {"condition": "has space"}}]'
            },
            "alert condition 'has space': must be 1-64 characters",
        ),
        (
            {
                "INGEST_ANOMALY_RULES": '[{"match": "*", "max": 1, "alert": {"condition": "c", "severity": "huge"}}]'
            },
            "anomaly.rules[0] (INGEST_ANOMALY_RULES): invalid enum value 'huge'",
        ),
        (
            {
                "INGEST_ANOMALY_RULES": '[{"match": "*", "max": 1, "alert": {"condition": "c", "flap_count": 3}}]'
            },
            "flap_window_s must be > 0 when flap_count is set",
        ),
        (
            {"INGEST_ALERTS_SINKS": '[{"type": "email", "name": "x"}]'},
            "alerts.sinks[0] (INGEST_ALERTS_SINKS): invalid value 'email'",
        ),
        (
            {
                "INGEST_ALERTS_SINKS": '[{"type": "cloudevents", "name": "a", "url": "http://x"}, {"type": "cloudevents", "name": "a", "url": "http://y"}]'
            },
            "alerts.sinks (INGEST_ALERTS_SINKS): the name 'a' is used twice",
        ),
        (
            {"INGEST_ALERTS_SINKS": '[{"type": "cloudevents", "name": "a", "url": "ftp://x"}]'},
            "alerts.sinks (INGEST_ALERTS_SINKS): a: url must start with http:// or https://",
        ),
        (
            {"INGEST_ALERTS_MAX_ATTEMPTS": "0"},
            "alerts.max_attempts (INGEST_ALERTS_MAX_ATTEMPTS): must be from 1 to 1000",
        ),
    ],
)
def test_bad_alert_settings_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(env={**BASE, **env})
    assert message in str(info.value)


async def test_check_config_masks_sink_secrets() -> None:
    sinks = [
        {
            "type": "servicenow",
            "name": "itsm",
            "url": "https://i.example",
            "username": "u",
            "password": "hunter2",
        },
        {"type": "pagerduty", "name": "pd", "routing_key": "R0UT1NGKEY"},
        {
            "type": "cloudevents",
            "name": "hook",
            "url": "https://h.example",
            "headers": {"Authorization": "Bearer t0k"},
        },
        {"type": "mqtt", "name": "b", "url": "mqtt://user:pa55@b:1883"},
    ]
    code, out, err = await ingest_cli(
        "check-config", env={**BASE, "INGEST_ALERTS_SINKS": json.dumps(sinks)}
    )
    assert code == 0, err
    for secret in ("hunter2", "R0UT1NGKEY", "t0k", "pa55"):
        assert secret not in out
    shown = json.loads(out)["alerts"]["sinks"]
    assert shown[0]["password"] == "***"
    assert shown[3]["url"] == "mqtt://user:***@b:1883"
