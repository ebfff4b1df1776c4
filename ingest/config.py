"""Configuration: one immutable object from a TOML file and `INGEST_*` environment variables."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec

from ingest.alerts.rules import Alerts
from ingest.anomaly.rules import AnomalyRule
from ingest.asset.rules import AssetRule
from ingest.errors import ConfigError
from ingest.mqtt.settings import Settings as Mqtt

ENV_PREFIX = "INGEST_"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Db(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[db]: the TimescaleDB connection."""

    url: str = ""
    migrate_url: str = ""
    writers: int = 2
    split_min_readings: int = 4_000
    connect_timeout_s: float = 10.0
    retry_min_s: float = 0.5
    retry_max_s: float = 30.0

    def __post_init__(self) -> None:
        for key, value in (("url", self.url), ("migrate_url", self.migrate_url)):
            if value and not re.match(r"^postgres(ql)?://", value):
                raise ValueError(f"{key}: must start with postgresql://")
        if not 1 <= self.writers <= 16:
            raise ValueError("writers: must be between 1 and 16")
        if self.split_min_readings < 1:
            raise ValueError("split_min_readings: must be >= 1")
        if self.connect_timeout_s <= 0:
            raise ValueError("connect_timeout_s: must be > 0")
        if self.retry_min_s <= 0:
            raise ValueError("retry_min_s: must be > 0")
        if self.retry_max_s < self.retry_min_s:
            raise ValueError("retry_max_s: must be >= retry_min_s")


class Flush(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[flush]: when buffered readings are written, and how much may wait unacknowledged."""

    max_readings: int = 100_000
    interval_s: float = 0.1
    max_inflight_readings: int = 2_000_000
    max_inflight_bytes: int = 128 * 1024 * 1024
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_readings < 1:
            raise ValueError("max_readings: must be >= 1")
        if self.interval_s <= 0:
            raise ValueError("interval_s: must be > 0")
        if self.max_inflight_readings < self.max_readings:
            raise ValueError("max_inflight_readings: must be >= max_readings")
        if self.max_inflight_bytes < 2 * 1024 * 1024:
            raise ValueError("max_inflight_bytes: must be at least 2 MiB")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s: must be >= 0")


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[limits]: what a payload may be; anything beyond becomes a dead letter."""

    max_payload_bytes: int = 1_048_576
    max_batch_readings: int = 1_000_000
    min_time: str = "2000-01-01T00:00:00Z"
    max_future_s: float = 86_400.0
    max_sensors_per_device: int = 10_000

    def __post_init__(self) -> None:
        if self.max_payload_bytes < 1:
            raise ValueError("max_payload_bytes: must be >= 1")
        if self.max_sensors_per_device < 1:
            raise ValueError("max_sensors_per_device: must be >= 1")
        if self.max_batch_readings < 1:
            raise ValueError("max_batch_readings: must be >= 1")
        if self.max_future_s < 0:
            raise ValueError("max_future_s: must be >= 0")
        try:
            parse_rfc3339_us(self.min_time)
        except ValueError as exc:
            raise ValueError(f"min_time: {exc}") from None


class Rollups(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[rollups]: 1-minute and 1-hour aggregates computed on the way in."""

    enabled: bool = True
    merge_interval_s: float = 30.0

    def __post_init__(self) -> None:
        if self.merge_interval_s <= 0:
            raise ValueError("merge_interval_s: must be > 0")


class Anomaly(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[anomaly]: filters per sensor; the first rule whose glob matches device/sensor applies."""

    rules: tuple[AnomalyRule, ...] = ()
    assets: tuple[AssetRule, ...] = ()
    """Asset health per device (`ingest.asset`): the first rule whose glob matches the device
    path applies, to a device with a model fitted by `ingest baseline`."""
    replay_max_s: float = 3600.0
    """A flush whose readings fall up to this long before its sensor's newest committed
    reading is merged in time order; older readings are skipped by the filters."""

    def __post_init__(self) -> None:
        if not 0 <= self.replay_max_s <= 30 * 86400:
            raise ValueError("replay_max_s: must be 0 to 2592000 seconds (30 days)")


class Retention(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[retention]: days of data `ingest retain` keeps per table; 0 keeps everything."""

    readings_days: float = 0.0
    rollup_1m_days: float = 0.0
    rollup_1h_days: float = 0.0
    anomalies_days: float = 0.0
    dead_letters_days: float = 0.0
    alert_deliveries_days: float = 0.0  # delivered outbox rows (ingest/alerts)

    def __post_init__(self) -> None:
        for field in msgspec.structs.fields(self):
            days = getattr(self, field.name)
            if not (days == 0 or 1 / 24 <= days <= 36_500):
                raise ValueError(f"{field.name}: must be 0 (keep all) or 1/24 to 36500 days")


class Sparkplug(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[sparkplug]: Sparkplug B 3.0 edge nodes, subscribed to beside the native prefix."""

    enabled: bool = True
    groups: tuple[str, ...] = ()
    store_transient: bool = False
    rebirth: bool = False
    host_id: str = ""
    unknown_alias_wait_s: float = 0.5
    reorder_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.unknown_alias_wait_s <= 60:
            raise ValueError("unknown_alias_wait_s: must be between 0 and 60")
        if not 0 <= self.reorder_timeout_s <= 3600:
            raise ValueError("reorder_timeout_s: must be between 0 and 3600")
        for group in self.groups:
            if not group or any(c in group for c in "/+#\0"):
                raise ValueError(f"groups: {group!r} must be non-empty, without / + # or NUL")
        if self.host_id and any(c in self.host_id for c in "/+#\0"):
            raise ValueError("host_id: must be without / + # or NUL")

    def topic_filters(self) -> tuple[str, ...]:
        """What to subscribe to: every group, or each configured one."""
        if not self.enabled:
            return ()
        if not self.groups:
            return ("spBv1.0/#",)
        return tuple(f"spBv1.0/{g}/#" for g in self.groups)


class Metrics(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[metrics]: the Prometheus exposition and health endpoints."""

    host: str = "0.0.0.0"
    port: int = 9108

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port: must be between 0 and 65535 (0: do not serve)")


class Log(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[log]: level and format of the service's log lines."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole configuration, validated."""

    db: Db = msgspec.field(default_factory=Db)
    mqtt: Mqtt = msgspec.field(default_factory=Mqtt)
    flush: Flush = msgspec.field(default_factory=Flush)
    limits: Limits = msgspec.field(default_factory=Limits)
    rollups: Rollups = msgspec.field(default_factory=Rollups)
    anomaly: Anomaly = msgspec.field(default_factory=Anomaly)
    retention: Retention = msgspec.field(default_factory=Retention)
    sparkplug: Sparkplug = msgspec.field(default_factory=Sparkplug)
    alerts: Alerts = msgspec.field(default_factory=Alerts)  # ingest/alerts
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    log: Log = msgspec.field(default_factory=Log)

    @property
    def client_id(self) -> str:
        """The MQTT client id: configured, else derived from the host name (stable per host)."""
        return self.mqtt.session_client_id


# Environment variables that do not follow INGEST_<SECTION>_<KEY>.
_ENV_ALIASES = {"INGEST_MIGRATE_DB_URL": ("db", "migrate_url")}
_ENV_IGNORED = {"INGEST_CONFIG"}


def parse_rfc3339_us(text: str) -> int:
    """Microseconds since the Unix epoch of an RFC 3339 time; ValueError when malformed."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time") from None
    if dt.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _sections() -> dict[str, type[msgspec.Struct]]:
    return {f.name: f.type for f in msgspec.structs.fields(Config)}


def env_name(section: str, key: str) -> str:
    """The environment variable of a setting."""
    for name, target in _ENV_ALIASES.items():
        if target == (section, key):
            return name
    return f"{ENV_PREFIX}{section}_{key}".upper()


def _from_env(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    known: dict[str, tuple[str, str, bool]] = {}
    for section, struct in _sections().items():
        for field in msgspec.structs.fields(struct):
            is_list = getattr(field.type, "__origin__", None) in (tuple, list)
            known[env_name(section, field.name)] = (section, field.name, is_list)
    out: dict[str, dict[str, Any]] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _ENV_IGNORED:
            continue
        target = known.get(name)
        if target is None:
            raise ConfigError(
                f"{name}: unknown setting (see the configuration table in the README)"
            )
        section, key, is_list = target
        parsed: Any = value
        if is_list:  # a list setting (anomaly.rules) is given as JSON
            try:
                parsed = msgspec.json.decode(value)
            except msgspec.DecodeError as exc:
                raise ConfigError(f"{section}.{key} ({name}): not valid JSON: {exc}") from None
        out.setdefault(section, {})[key] = parsed
    return out


def _describe(path: str) -> str:
    """`$.flush.max_readings` -> `flush.max_readings (INGEST_FLUSH_MAX_READINGS)`."""
    parts = [p for p in path.removeprefix("$").split(".") if p]
    if len(parts) >= 2:
        key = re.sub(r"\[\d+\]$", "", parts[1])
        return f"{parts[0]}.{parts[1]} ({env_name(parts[0], key)})"
    if len(parts) == 1:
        return f"[{parts[0]}]"
    return "config"


def load(
    *, path: str | None = None, env: Mapping[str, str] | None = None, for_migrate: bool = False
) -> Config:
    """Read the TOML file (optional) and the environment; raise ConfigError naming the bad key.

    `for_migrate`: only a database URL for migrations is needed (db.migrate_url or db.url).
    """
    env = os.environ if env is None else env
    path = path or env.get("INGEST_CONFIG") or None
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    for section, values in _from_env(env).items():
        target = raw.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] in {path} must be a table")
        target.update(values)
    try:
        config = msgspec.convert(raw, type=Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc)) from exc
    if for_migrate and config.db.migrate_url:
        return config
    if not config.db.url:
        raise ConfigError(
            "db.url (INGEST_DB_URL): is required, e.g. postgresql://ingest:secret@dbhost:5432/telemetry"
        )
    return config


def _explain(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    message, _, path = text.rpartition(" - at `")
    path = path.rstrip("`")
    if not message:
        return f"config: {text}"
    if "unknown field" in message.lower():
        field = re.search(r"`([^`]+)`", message)
        name = field.group(1) if field else "?"
        where = f"{path.removeprefix('$.')}.{name}" if path != "$" else name
        return f"{where}: unknown key (see the configuration table in the README)"
    # Our own checks start "key: " ([mqtt]'s "mqtt.key: ", so that it reads alone too).
    own = re.match(r"^(?:[a-z_]+\.)?([a-z_]+): (.*)$", message)
    if own and path.count(".") == 1:
        return f"{_describe(path + '.' + own.group(1))}: {own.group(2)}"
    return f"{_describe(path)}: {message[0].lower()}{message[1:]}"
