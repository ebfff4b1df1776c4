"""Configuration: TOML plus environment, one clear message per bad key, documented keys."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import pytest

from ingest import config
from ingest.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
BASE = {"INGEST_DB_URL": "postgresql://ingest@db/telemetry"}


def all_keys() -> list[tuple[str, str, str]]:
    """(section, key, environment variable) of every setting."""
    out = []
    for section in msgspec.structs.fields(config.Config):
        for field in msgspec.structs.fields(section.type):
            out.append((section.name, field.name, config.env_name(section.name, field.name)))
    return out


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text(
        '[db]\nurl = "postgresql://file@db/telemetry"\n[flush]\nmax_readings = 5000\ninterval_s = 0.5\n'
    )
    cfg = config.load(path=str(path), env={"INGEST_FLUSH_MAX_READINGS": "7000"})
    assert cfg.db.url == "postgresql://file@db/telemetry"
    assert cfg.flush.max_readings == 7000
    assert cfg.flush.interval_s == 0.5


def test_defaults() -> None:
    cfg = config.load(env=BASE)
    assert cfg.mqtt.topic_prefix == "telemetry"
    assert cfg.mqtt.share_group == ""
    assert cfg.metrics.port == 9108
    assert cfg.client_id.startswith("ingest-")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {},
            "db.url (INGEST_DB_URL): is required, e.g. postgresql://ingest:secret@dbhost:5432/telemetry",
        ),
        (
            {**BASE, "INGEST_FLUSH_MAX_READINGS": "lots"},
            "flush.max_readings (INGEST_FLUSH_MAX_READINGS): expected `int`, got `str`",
        ),
        (
            {**BASE, "INGEST_FLUSH_INTERVAL_S": "0"},
            "flush.interval_s (INGEST_FLUSH_INTERVAL_S): must be > 0",
        ),
        (
            {**BASE, "INGEST_DB_SPLIT_MIN_READINGS": "0"},
            "db.split_min_readings (INGEST_DB_SPLIT_MIN_READINGS): must be >= 1",
        ),
        (
            {**BASE, "INGEST_RETENTION_READINGS_DAYS": "-7"},
            "retention.readings_days (INGEST_RETENTION_READINGS_DAYS): must be 0 (keep all) or "
            "1/24 to 36500 days",
        ),
        (
            {**BASE, "INGEST_SPARKPLUG_UNKNOWN_ALIAS_WAIT_S": "-1"},
            "sparkplug.unknown_alias_wait_s (INGEST_SPARKPLUG_UNKNOWN_ALIAS_WAIT_S): must be "
            "between 0 and 60",
        ),
        (
            {**BASE, "INGEST_SPARKPLUG_REORDER_TIMEOUT_S": "7200"},
            "sparkplug.reorder_timeout_s (INGEST_SPARKPLUG_REORDER_TIMEOUT_S): must be between 0 "
            "and 3600",
        ),
        (
            {**BASE, "INGEST_MQTT_URL": "tcp://broker"},
            "mqtt.url (INGEST_MQTT_URL): must start with mqtt:// or mqtts://",
        ),
        (
            {**BASE, "INGEST_MQTT_RECEIVE_MAXIMUM": "70000"},
            "mqtt.receive_maximum (INGEST_MQTT_RECEIVE_MAXIMUM): must be between 1 and 65535",
        ),
        (
            {**BASE, "INGEST_MQTT_SHARE_GROUP": "a/b"},
            "mqtt.share_group (INGEST_MQTT_SHARE_GROUP): must be 1-64 characters from A-Z a-z 0-9 _ . : -",
        ),
        (
            {**BASE, "INGEST_LOG_FORMAT": "xml"},
            "log.format (INGEST_LOG_FORMAT): invalid enum value 'xml'",
        ),
        (
            {**BASE, "INGEST_LIMITS_MIN_TIME": "last year"},
            "limits.min_time (INGEST_LIMITS_MIN_TIME): 'last year' is not an RFC 3339 time",
        ),
        (
            {**BASE, "INGEST_FLUSH_MAX_READINGZ": "1"},
            "INGEST_FLUSH_MAX_READINGZ: unknown setting (see the configuration table in the README)",
        ),
        ({"INGEST_DB_URL": "mysql://db"}, "db.url (INGEST_DB_URL): must start with postgresql://"),
    ],
)
def test_bad_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(env=env)
    assert str(info.value) == message


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text("[flush]\nmax_reading = 5\n")
    with pytest.raises(ConfigError) as info:
        config.load(path=str(path), env=BASE)
    assert (
        str(info.value)
        == "flush.max_reading: unknown key (see the configuration table in the README)"
    )


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(path=str(tmp_path / "missing.toml"), env=BASE)
    assert str(info.value) == f"config file {tmp_path / 'missing.toml'}: No such file or directory"


def test_example_config_is_valid_and_sets_every_key() -> None:
    path = ROOT / "deploy" / "ingest.example.toml"
    cfg = config.load(path=str(path), env={})
    text = path.read_text()
    assert cfg.mqtt.topic_prefix == "telemetry"
    for section, key, _ in all_keys():
        block = re.search(rf"^\[{section}\]\n(.*?)(?=^\[|\Z)", text, re.S | re.M)
        assert block, f"[{section}] missing from the example config"
        assert re.search(rf"^#? ?{key} = ", block.group(1), re.M), f"{section}.{key} missing"


def test_readme_table_documents_every_key() -> None:
    readme = (ROOT / "README.md").read_text()
    for section, key, env in all_keys():
        assert re.search(rf"^\| `{section}\.{key}` \| `{env}` \|", readme, re.M), (
            f"{section}.{key} is not in the README's configuration table"
        )


def test_migrate_needs_only_the_owner_url() -> None:
    env = {"INGEST_MIGRATE_DB_URL": "postgresql://owner@db/telemetry"}
    assert config.load(env=env, for_migrate=True).db.migrate_url == env["INGEST_MIGRATE_DB_URL"]
    with pytest.raises(ConfigError, match=r"^db.url \(INGEST_DB_URL\): is required"):
        config.load(env=env)
