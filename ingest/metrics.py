"""Prometheus metrics and the `/metrics`, `/healthz`, `/readyz` endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.25,
    0.3,
    0.4,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

MESSAGES_RECEIVED = Counter("ingest_messages_received_total", "MQTT messages received.")
MESSAGES_ACKED = Counter(
    "ingest_messages_acknowledged_total", "MQTT messages acknowledged after their flush committed."
)
PAYLOAD_BYTES = Counter("ingest_payload_bytes_total", "Payload bytes received.")
DEAD_LETTERS = Counter(
    "ingest_dead_letters_total",
    "Messages rejected and stored as dead letters, by the field the reason names.",
    ["field"],
)
READINGS_WRITTEN = Counter("ingest_readings_written_total", "Readings inserted into the database.")
READINGS_DUPLICATE = Counter(
    "ingest_readings_duplicate_total",
    "Readings skipped because they were already stored (redeliveries, device retries).",
)
READINGS_SUPERSEDED = Counter(
    "ingest_readings_superseded_total",
    "Readings replaced by a later reading of the same sensor and time within one flush.",
)
ROLLUP_ROWS = Counter(
    "ingest_rollup_rows_written_total",
    "Rollup rows upserted by merges of the pending partials, by bucket width.",
    ["width"],
)
ROLLUP_PARTIALS = Counter(
    "ingest_rollup_partials_total",
    "1-minute rollup partials computed by flushes (held in memory until the next merge).",
)
ROLLUP_MERGES = Counter(
    "ingest_rollup_merges_total",
    "Merges of rollup partials into the rollup tables by this ingester.",
)
ROLLUP_RECOVERED = Counter(
    "ingest_rollup_journal_recovered_total",
    "Rollup journal rows of other ingester processes (killed, or their lock lost), or of its "
    "own transactions whose outcome it did not hear, whose readings this ingester rolled up "
    "again.",
)
ANOMALIES = Counter("ingest_anomalies_total", "Anomaly events opened, by kind.", ["kind"])
LATE_READINGS = Counter(
    "ingest_late_readings_total",
    "Readings older than anomaly.replay_max_s before the newest committed for their sensor: "
    "stored and rolled up, but not run through the anomaly filters.",
)
ANOMALY_STATE_SYNCS = Counter(
    "ingest_anomaly_state_syncs_total",
    "Sensor anomaly states brought up to date in a flush's transaction: restored from stored "
    "readings, caught up with readings other ingesters committed, or replayed to merge a late "
    "flush.",
    ["how"],
)
ANOMALY_RERUN_READINGS = Counter(
    "ingest_anomaly_rerun_readings_total",
    "Stored readings run through the anomaly filters again, to catch up or to merge a late flush.",
)
ASSET_TIMESTAMPS = Counter(
    "ingest_asset_timestamps_total",
    "Device timestamps scored against an asset-health model (T² and Q).",
)
ASSET_REPLAYS = Counter(
    "ingest_asset_replays_total",
    "Devices re-scored from a quiet timestamp to merge readings at or before their newest "
    "scored timestamp.",
)
ASSET_LATE_READINGS = Counter(
    "ingest_asset_late_readings_total",
    "Readings of a scored device that came too late to be re-scored (no quiet timestamp within "
    "the asset rule's replay_s): stored, but not scored.",
)
FLUSH_READINGS = Histogram(
    "ingest_flush_readings",
    "Readings per flush.",
    buckets=(10, 100, 1_000, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000),
)
FLUSH_SECONDS = Histogram(
    "ingest_flush_duration_seconds",
    "Time from the start of a flush's transaction to its commit.",
    buckets=_LATENCY_BUCKETS,
)
COPY_SECONDS = Histogram(
    "ingest_copy_duration_seconds",
    "Time of the readings COPY of a flush.",
    buckets=_LATENCY_BUCKETS,
)


class BatchHistogram(Collector):
    """A histogram observed a batch at a time (`observe_many`: one numpy pass for a flush's
    messages, not a call per message); exposed like a `Histogram` without labels. Use it from
    the event loop's thread only."""

    def __init__(self, name: str, documentation: str, *, buckets: Sequence[float]) -> None:
        self._name, self._doc = name, documentation
        self._bounds = np.array([*buckets, math.inf], np.float64)
        self._labels = [repr(b) for b in buckets] + ["+Inf"]
        self._counts = np.zeros(len(self._bounds), np.int64)
        self._sum = 0.0
        REGISTRY.register(self)

    def observe_many(self, values: npt.NDArray[np.float64]) -> None:
        """Observe every value of `values` (none NaN)."""
        # A value counts in the first bucket whose bound is at least the value.
        where = np.searchsorted(self._bounds, values, side="left")
        self._counts += np.bincount(where, minlength=len(self._bounds))
        self._sum += float(values.sum())

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative = np.cumsum(self._counts).tolist()
        yield HistogramMetricFamily(
            self._name,
            self._doc,
            buckets=list(zip(self._labels, cumulative, strict=True)),
            sum_value=self._sum,
        )


COMMIT_LAG = BatchHistogram(
    "ingest_publish_to_commit_seconds",
    "Time from publication (the message's 'ts' user property, else receipt) to commit.",
    buckets=_LATENCY_BUCKETS,
)
INFLIGHT_MESSAGES = Gauge("ingest_inflight_messages", "Messages received and not yet acknowledged.")
INFLIGHT_BYTES = Gauge("ingest_inflight_bytes", "Payload bytes received and not yet acknowledged.")
INFLIGHT_READINGS = Gauge("ingest_inflight_readings", "Readings received and not yet acknowledged.")
SENSORS_KNOWN = Gauge(
    "ingest_sensors_known",
    "Sensors this ingester has had messages of since it started (its registry cache is "
    "loaded whole at start).",
)
MQTT_RECONNECTS = Counter("ingest_mqtt_reconnects_total", "Reconnections to the MQTT broker.")
SESSIONS_ENDED = Counter(
    "ingest_mqtt_sessions_ended_total",
    "Broker sessions ended empty: a share group left on stop, or a session drained.",
)
DB_RETRIES = Counter(
    "ingest_db_retries_total", "Flush attempts retried after a transient database error."
)
LAST_COMMIT = Gauge(
    "ingest_last_commit_timestamp_seconds", "Unix time of the last committed flush."
)
READY = Gauge("ingest_ready", "1 when connected to the broker and the database, schema current.")

_INDEX = re.compile(r"\[\d+\]")


def reason_field(reason: str) -> str:
    """The bounded label for a dead letter: the field its reason names, without indices."""
    head = reason.split(":", 1)[0].strip()
    head = _INDEX.sub("", head)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,32}", head):
        return "other"
    return head


@dataclass(slots=True)
class Health:
    """What `/readyz` reports; written by the pipeline, read by the HTTP handler."""

    broker: bool = False
    database: bool = False
    schema: bool = False
    stopping: bool = False

    @property
    def ready(self) -> bool:
        return self.broker and self.database and self.schema and not self.stopping

    def describe(self) -> str:
        parts = [
            f"broker: {'connected' if self.broker else 'not connected'}",
            f"database: {'connected' if self.database else 'not connected'}",
            f"schema: {'current' if self.schema else 'not checked or behind'}",
        ]
        if self.stopping:
            parts.append("stopping")
        return "\n".join(parts) + "\n"


async def _handle(
    health: Health, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        request = await asyncio.wait_for(reader.readline(), timeout=10)
        # Skip the headers: nothing here depends on them.
        while await asyncio.wait_for(reader.readline(), timeout=10) not in (b"\r\n", b"\n", b""):
            pass
        parts = request.decode("latin-1").split()
        method, path = (parts[0], parts[1].split("?", 1)[0]) if len(parts) >= 2 else ("", "")
        if method not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
        elif path == "/metrics":
            READY.set(1 if health.ready else 0)
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(REGISTRY)
        elif path == "/healthz":
            status, ctype, body = "200 OK", "text/plain", b"ok\n"
        elif path == "/readyz":
            ok = health.ready
            status = "200 OK" if ok else "503 Service Unavailable"
            ctype, body = "text/plain", health.describe().encode()
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head if method == "HEAD" else head + body)
        await writer.drain()
    except (TimeoutError, ConnectionError, UnicodeDecodeError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve(*, host: str, port: int, health: Health) -> AsyncIterator[int]:
    """Serve the endpoints on the running loop; yields the bound port (0 means not served)."""
    if port == 0:
        yield 0
        return

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(health, reader, writer)

    server = await asyncio.start_server(handler, host, port)
    bound = server.sockets[0].getsockname()[1]
    log.info("metrics and health endpoints on http://%s:%d/metrics", host, bound)
    try:
        yield bound
    finally:
        server.close()
        await server.wait_closed()


# ---- alerts (ingest/alerts)
ALERTS_OPEN = Gauge("ingest_alerts_open", "Alerts open or flapping, by severity.", ["severity"])
ALERT_CHANGES = Counter(
    "ingest_alert_changes_total", "Alert notifications written to the outbox by this ingester."
)
ALERT_NOTIFICATIONS = Counter(
    "ingest_alert_notifications_total",
    "Alert notification attempts by sink and outcome: sent, retried, failed (for good).",
    ["sink", "outcome"],
)
ALERT_OUTBOX_LAG = Gauge(
    "ingest_alert_outbox_lag_seconds", "Age of the oldest undelivered alert notification."
)
ALERT_OUTBOX_PENDING = Gauge(
    "ingest_alert_outbox_pending", "Alert notifications waiting for delivery (every sink)."
)
ALERT_OUTBOX_FAILED = Gauge(
    "ingest_alert_outbox_failed", "Alert notifications that failed for good (every sink)."
)
