"""The pipeline: wires source, decode, registry, kernels and sink, and acknowledges after commit."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest import memory, metrics
from ingest.alerts.service import start as start_alerts
from ingest.config import Config, parse_rfc3339_us
from ingest.decode import Batch, DecodeLimits, decode_batch, parse_topic
from ingest.derive import Derived, Deriver, merge_rollups
from ingest.errors import (
    ConfigError,
    InternalError,
    PayloadError,
    PermanentSinkError,
    TransientSinkError,
)
from ingest.kernels import check_sorted, gather
from ingest.migrate import default_schema_dir, load_migrations, pending
from ingest.mqtt import MqttSource, Received
from ingest.registry import Registry, SensorKey
from ingest.sink import CLIENT_ERRORS, DeadLetter, Readings, Sink, Upsert, classify
from ingest.sparkplug.commands import HostApplication, RebirthRequester
from ingest.sparkplug.stage import Columns, Item, Prepared, SparkplugStage
from ingest.sparkplug.stage import warm_up as warm_up_sparkplug
from ingest.sparkplug.topic import is_sparkplug

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Accepted:
    levels: tuple[str, ...]
    batch: Batch
    received: Received | None = None


@dataclass(slots=True)
class FlushJob:
    """Messages gathered for one flush, in arrival order."""

    received: list[Received] = field(default_factory=list)
    accepted: list[_Accepted] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    readings: int = 0
    nbytes: int = 0
    sparkplug: list[Item] = field(default_factory=list)
    # Prepared again while no part of the flush has committed, else kept for its retries.
    sparkplug_prepared: Prepared | None = None
    carried: int = 0  # Sparkplug messages held back from an earlier flush

    def __bool__(self) -> bool:
        return bool(self.received)

    def has_news(self) -> bool:
        """Whether it holds more than messages carried from an earlier flush."""
        return len(self.received) > self.carried


class _Budget:
    """Caps what is received and not yet acknowledged, in bytes and readings.

    The in-flight gauges read it when scraped, so taking a message costs no metric update.
    """

    def __init__(self, *, max_bytes: int, max_readings: int) -> None:
        self.max_bytes, self.max_readings = max_bytes, max_readings
        self.bytes = self.readings = self.messages = 0
        self._changed = asyncio.Condition()
        metrics.INFLIGHT_BYTES.set_function(lambda: self.bytes)
        metrics.INFLIGHT_READINGS.set_function(lambda: self.readings)
        metrics.INFLIGHT_MESSAGES.set_function(lambda: self.messages)

    def has_room(self) -> bool:
        return self.bytes < self.max_bytes and self.readings < self.max_readings

    async def wait_for_room(self) -> None:
        if self.has_room():
            return
        async with self._changed:
            await self._changed.wait_for(self.has_room)

    def take(self, *, nbytes: int, readings: int) -> None:
        self.bytes += nbytes
        self.readings += readings
        self.messages += 1

    async def release(self, *, nbytes: int, readings: int, messages: int) -> None:
        async with self._changed:
            self.bytes -= nbytes
            self.readings -= readings
            self.messages -= messages
            self._changed.notify_all()


def channel_keys(job: FlushJob) -> list[SensorKey]:
    """The sensor of every channel of the flush, in arrival order."""
    return [SensorKey(item.levels, ch.name) for item in job.accepted for ch in item.batch.channels]


def build_readings(
    job: FlushJob, sensor_ids: Sequence[int | None] | npt.NDArray[np.int32]
) -> tuple[Readings, int]:
    """The flush's readings as columns sorted by (sensor, time); for a repeated (sensor, time)
    the reading that arrived last wins. Returns the columns and how many were superseded.
    `sensor_ids` holds the id of every channel's sensor, in arrival order.

    Channels usually hold rising times, and a sensor's channels from later messages start
    after the earlier ones end: then gathering whole channels in (sensor, first time) order
    sorts the flush, which one linear check confirms. Anything else takes a stable sort of
    every reading.
    """
    batches = [item.batch for item in job.accepted]
    if not len(sensor_ids):
        empty = Readings(
            np.empty(0, np.int64),
            np.empty(0, np.int32),
            np.empty(0, np.float64),
            np.empty(0, np.uint8),
        )
        return empty, 0
    if not isinstance(sensor_ids, np.ndarray):
        assert None not in sensor_ids, "resolve() registers every sensor of the flush first"
    sensor = np.asarray(sensor_ids, dtype=np.int32)  # per channel, in arrival order
    lengths = np.array([len(ch.time) for b in batches for ch in b.channels], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    time = np.concatenate([b.time for b in batches])
    value = np.concatenate([b.value for b in batches])
    quality = np.concatenate([b.quality for b in batches])
    order = np.lexsort((time[starts], sensor))  # stable: ties keep arrival order
    slab = Readings(*gather(time, value, quality, starts[order], lengths[order], sensor[order]))
    if check_sorted(slab.sensor, slab.time) < 0:
        return slab, 0
    return _sort_readings(Readings(time, np.repeat(sensor, lengths), value, quality))


def _sort_readings(arrived: Readings) -> tuple[Readings, int]:
    """`arrived` (in arrival order) sorted by (sensor, time), keeping the last of equal keys."""
    order = np.lexsort((arrived.time, arrived.sensor))  # stable: equal keys keep arrival order
    time_col, sensor_col = arrived.time[order], arrived.sensor[order]
    value_col, quality_col = arrived.value[order], arrived.quality[order]
    repeated = (sensor_col[1:] == sensor_col[:-1]) & (time_col[1:] == time_col[:-1])
    if repeated.any():
        keep = np.ones(len(time_col), dtype=bool)
        keep[:-1] = ~repeated
        slab = Readings(time_col[keep], sensor_col[keep], value_col[keep], quality_col[keep])
        return slab, int(repeated.sum())
    return Readings(time_col, sensor_col, value_col, quality_col), 0


def merge_sparkplug(readings: Readings, columns: Columns) -> tuple[Readings, int]:
    """Sorted `readings` with a flush's Sparkplug readings (arrival order) added; a repeated
    (sensor, time) keeps the later one. Returns the readings and how many were superseded."""
    if not len(columns.time):
        return readings, 0
    return _sort_readings(
        Readings(
            np.concatenate([readings.time, columns.time]),
            np.concatenate([readings.sensor, columns.sensor]),
            np.concatenate([readings.value, columns.value]),
            np.concatenate([readings.quality, columns.quality]),
        )
    )


def _derive_with(
    deriver: Deriver, upserts: Sequence[Upsert], *, skip_nan: bool
) -> Callable[[Readings], Derived]:
    """`deriver.derive` plus the Sparkplug births' writes, first, in the same transaction.
    With `skip_nan`, the stale rows of deaths (NaN) stay out of rollups and anomaly filters."""

    def derive(new: Readings) -> Derived:
        derived = deriver.derive(new.select(~np.isnan(new.value)) if skip_nan else new)
        return dataclasses.replace(derived, upserts=[*upserts, *derived.upserts])

    return derive


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; keep everything else as received."""
    return None if text is None else text.replace("\x00", "\\x00")


# Leaving a share group: the session is empty once everything received is acknowledged and
# nothing more arrived for this long after the broker confirmed the UNSUBSCRIBE.
_QUIET_S = 1.0


@dataclass(slots=True)
class _Carried:
    """The messages of a flush carried into the next one, by index, and their size."""

    indices: set[int] = field(default_factory=set)
    nbytes: int = 0
    readings: int = 0


class Pipeline:
    """One ingester: intake task, flush timer and writer task under one TaskGroup."""

    def __init__(self, cfg: Config, *, health: metrics.Health) -> None:
        self.cfg = cfg
        self.health = health
        self.registry = Registry(max_sensors_per_device=cfg.limits.max_sensors_per_device)
        self.rebirths: RebirthRequester | None = None
        if cfg.sparkplug.enabled and cfg.sparkplug.rebirth:
            self.rebirths = RebirthRequester(
                url=cfg.mqtt.url,
                client_id=f"{cfg.client_id}-cmd",
                tls_ca_file=cfg.mqtt.tls_ca_file or None,
            )
        self.host: HostApplication | None = None
        if cfg.sparkplug.enabled and cfg.sparkplug.host_id:
            self.host = HostApplication(
                url=cfg.mqtt.url,
                client_id=f"{cfg.client_id}-host",
                host_id=cfg.sparkplug.host_id,
                tls_ca_file=cfg.mqtt.tls_ca_file or None,
            )
        self.sparkplug = SparkplugStage(
            store_transient=cfg.sparkplug.store_transient,
            on_unknown_alias=self.rebirths.want if self.rebirths is not None else None,
            unknown_alias_wait_s=cfg.sparkplug.unknown_alias_wait_s,
            reorder_timeout_s=cfg.sparkplug.reorder_timeout_s,
        )
        self.deriver = Deriver(
            rules=cfg.anomaly.rules, rollups=cfg.rollups.enabled, registry=self.registry
        )
        self.sinks = [
            Sink(dsn=cfg.db.url, connect_timeout_s=cfg.db.connect_timeout_s)
            for _ in range(cfg.db.writers)
        ]
        self._merge_sink = Sink(dsn=cfg.db.url, connect_timeout_s=cfg.db.connect_timeout_s)
        self._stop_merging = asyncio.Event()
        self.source = MqttSource(
            settings=cfg.mqtt,
            extra_filters=cfg.sparkplug.topic_filters(),
            max_payload_bytes=cfg.limits.max_payload_bytes,
            # What waits unread in the source counts towards memory as much as what is in flight.
            max_queued_bytes=cfg.flush.max_inflight_bytes // 4,
            on_reconnect=metrics.MQTT_RECONNECTS.inc,
        )
        self.limits = DecodeLimits(
            max_payload_bytes=cfg.limits.max_payload_bytes,
            max_readings=cfg.limits.max_batch_readings,
            min_time_us=parse_rfc3339_us(cfg.limits.min_time),
            max_future_us=int(cfg.limits.max_future_s * 1_000_000),
        )
        self._budget = _Budget(
            max_bytes=cfg.flush.max_inflight_bytes, max_readings=cfg.flush.max_inflight_readings
        )
        self._job = FlushJob()
        self._job_started = 0.0
        self._last_received = time.monotonic()
        self.session_ended = False
        """Whether stopping ended the broker-side session (see `_end_session`)."""
        self._queue: asyncio.Queue[FlushJob | None] = asyncio.Queue(maxsize=1)
        self._writer_idle = False
        self._dispatch_lock = asyncio.Lock()

    # ------------------------------------------------------------------ intake

    def _accept(self, msg: Received) -> None:
        """Decode one message into the current flush, or make it a dead letter. Never awaits."""
        job = self._job
        self._last_received = time.monotonic()
        if not job:
            self._job_started = self._last_received
        job.received.append(msg)
        job.nbytes += len(msg.payload)
        metrics.MESSAGES_RECEIVED.inc()
        metrics.PAYLOAD_BYTES.inc(len(msg.payload))
        try:
            if self.cfg.sparkplug.enabled and is_sparkplug(msg.topic):
                self._accept_sparkplug(msg, job)
                return
            levels = parse_topic(msg.topic, prefix=self.cfg.mqtt.topic_prefix)
            batch = decode_batch(
                msg.payload,
                content_type=msg.content_type,
                limits=self.limits,
                now_us=time.time_ns() // 1000,
            )
        except PayloadError as exc:
            job.dead_letters.append(
                DeadLetter(
                    received_us=msg.received_ns // 1000,
                    topic=_clean(msg.topic) or "",
                    payload=msg.payload,
                    reason=exc.reason,
                    content_type=_clean(msg.content_type),
                )
            )
            metrics.DEAD_LETTERS.labels(metrics.reason_field(exc.reason)).inc()
            self._budget.take(nbytes=len(msg.payload), readings=0)
            return
        job.accepted.append(_Accepted(levels, batch, msg))
        job.readings += batch.readings
        self._budget.take(nbytes=len(msg.payload), readings=batch.readings)

    def _accept_sparkplug(self, msg: Received, job: FlushJob) -> None:
        """A Sparkplug message into the flush; raises PayloadError."""
        size = len(msg.payload)
        if size > self.limits.max_payload_bytes:
            raise PayloadError(
                f"payload: {size} bytes exceeds the {self.limits.max_payload_bytes}-byte limit"
            )
        now_us = time.time_ns() // 1000
        item = self.sparkplug.accept(
            index=len(job.received) - 1,
            topic=msg.topic,
            payload=msg.payload,
            received_us=msg.received_ns // 1000,
            window=(self.limits.min_time_us, now_us + self.limits.max_future_us),
            max_metrics=self.limits.max_readings,
        )
        readings = 0 if item is None else len(item.decoded)
        if item is not None:
            job.sparkplug.append(item)
        job.readings += readings
        self._budget.take(nbytes=size, readings=readings)

    async def _dispatch(self) -> None:
        """Hand the current flush to the writer (waits while the writer is behind)."""
        async with self._dispatch_lock:
            if not self._job:
                return
            job, self._job = self._job, FlushJob()
            await self._queue.put(job)

    async def _intake(self) -> None:
        # A flush goes to the writer when it is full, or at once when the writer is idle: under
        # load, flushes grow with what gathers while the previous one is written; at low rates,
        # nothing waits for a timer.
        async for msg in self.source.messages():
            self._accept(msg)
            if self._job.readings >= self.cfg.flush.max_readings or self._writer_idle:
                await self._dispatch()
            await self._budget.wait_for_room()

    async def _timer(self) -> None:
        interval = self.cfg.flush.interval_s
        while True:
            await asyncio.sleep(interval / 4)
            self.health.broker = self.source.connected
            if self._job and time.monotonic() - self._job_started >= interval:
                await self._dispatch()

    # ------------------------------------------------------------------ writer

    async def _writer(self) -> None:
        while True:
            if self._queue.empty() and self._job.has_news():
                await self._dispatch()  # what gathered while the last flush was written
            self._writer_idle = True
            job = await self._queue.get()
            self._writer_idle = False
            if job is None:
                if not self._job:
                    return
                # Stopping with messages held for a birth: flush them again (they become dead
                # letters within sparkplug.unknown_alias_wait_s at the latest).
                self._queue.put_nowait(None)
                await asyncio.sleep(self.cfg.flush.interval_s)
                job, self._job = self._job, FlushJob()
            await self._commit(job)
            carried = self._carry(job)
            # Only what the current connection takes: after a reconnect the broker delivers
            # the others again, and they are counted when those copies are acknowledged.
            acked = 0
            for i, msg in enumerate(job.received):
                if i not in carried.indices:
                    acked += self.source.ack(msg.token)
            metrics.MESSAGES_ACKED.inc(acked)
            await self._budget.release(
                nbytes=job.nbytes - carried.nbytes,
                readings=job.readings - carried.readings,
                messages=len(job.received) - len(carried.indices),
            )

    def _carry(self, job: FlushJob) -> _Carried:
        """Move the messages a committed flush held back (Sparkplug DATA waiting for a birth)
        into the flush being gathered: unacknowledged, and in flight still."""
        carried = _Carried()
        if job.sparkplug_prepared is None or not job.sparkplug_prepared.held:
            return carried
        target = self._job
        if not target:
            self._job_started = time.monotonic()  # tried again after flush.interval_s
        items = {item.index: item for item in job.sparkplug}
        for i in job.sparkplug_prepared.held:
            item, msg = items[i], job.received[i]
            target.sparkplug.append(dataclasses.replace(item, index=len(target.received)))
            target.received.append(msg)
            target.carried += 1
            target.nbytes += len(msg.payload)
            target.readings += len(item.decoded)
            carried.indices.add(i)
            carried.nbytes += len(msg.payload)
            carried.readings += len(item.decoded)
        return carried

    async def _commit(self, job: FlushJob) -> None:
        """Write one flush, retrying transient database errors with capped backoff.

        The flush is split by sensor over the writer connections, each part in a transaction
        of its own, written at the same time; a part that committed is not written again.
        """
        delay = self.cfg.db.retry_min_s
        started = time.monotonic()
        written: set[int] = set()
        committed = False
        while True:
            try:
                if not committed:
                    await self._try_commit(job, written, started)
                    committed = True
                await self._merge_seq(job)
                self.health.database = True
                return
            except TransientSinkError as exc:
                self.health.database = False
                metrics.DB_RETRIES.inc()
                log.warning(
                    "flush of %d messages not written, retrying in %.1fs: %s",
                    len(job.received),
                    delay,
                    exc,
                )
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.cfg.db.retry_max_s)
                for sink in self.sinks:
                    if not sink.connected:
                        with contextlib.suppress(TransientSinkError):
                            await sink.connect()

    async def _try_commit(self, job: FlushJob, written: set[int], started: float) -> None:
        conn = self.sinks[0].connection
        stage = "resolve"
        try:
            ids = await self._resolve(conn, job)
            stage = "assembly"
            readings, superseded = build_readings(job, ids)
            if job.sparkplug:
                stage = "Sparkplug prepare"
                if job.sparkplug_prepared is None or not written:
                    # Again on a retry: another instance may have changed a node meanwhile
                    # (the check of the node versions failed), or its birth may have come.
                    job.sparkplug_prepared = await self.sparkplug.prepare(
                        conn,
                        items=job.sparkplug,
                        registry=self.registry,
                        now_us=time.time_ns() // 1000,
                    )
                readings, more = merge_sparkplug(readings, job.sparkplug_prepared.columns)
                superseded += more
            stage = "prepare"
            await self.deriver.prepare(conn, readings=readings)
        except (PermanentSinkError, TransientSinkError):
            raise
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                self.sinks[0].discard()  # its state is unknown after a client-side error
            raise classify(exc) from exc
        except Exception as exc:
            # A defect of ours: say so, and keep the connection, which did nothing wrong.
            raise InternalError(f"{stage}: {type(exc).__name__}: {exc}") from exc
        # Split only into parts of at least db.split_min_readings: for a small flush a second
        # transaction costs more than writing in parallel saves.
        parts = max(1, min(len(self.sinks), len(readings) // self.cfg.db.split_min_readings))
        prepared = job.sparkplug_prepared
        births = prepared.upserts if prepared is not None else []
        dead_letters = job.dead_letters + self._sparkplug_dead_letters(job)
        derive0: Callable[[Readings], Derived] = self.deriver.derive
        if prepared is not None and (births or prepared.stale_rows):
            derive0 = _derive_with(self.deriver, births, skip_nan=prepared.stale_rows > 0)
        if births:
            parts = 1  # a birth's aliases commit in the transaction of its readings
        slabs = [readings]
        if parts > 1:
            part_of = readings.sensor % parts
            slabs = [readings.select(part_of == p) for p in range(parts)]
        todo = [
            p
            for p in range(parts)
            if p not in written and (len(slabs[p]) or (p == 0 and (dead_letters or births)))
        ]
        outcomes = await asyncio.gather(
            *(
                self.sinks[p].write(
                    readings=slabs[p],
                    dead_letters=dead_letters if p == 0 else (),
                    derive=derive0 if p == 0 else self.deriver.derive,
                )
                for p in todo
            ),
            return_exceptions=True,
        )
        failure: BaseException | None = None
        for p, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                continue
            result, derived = outcome
            written.add(p)
            self.deriver.commit(derived)
            metrics.READINGS_WRITTEN.inc(result.inserted)
            metrics.READINGS_DUPLICATE.inc(result.duplicates)
            metrics.COPY_SECONDS.observe(result.copy_seconds)
            if result.staged:
                log.info(
                    "a flush part of %d readings held %d already stored (redelivery)",
                    result.inserted + result.duplicates,
                    result.duplicates,
                )
        if failure is not None:
            raise failure
        if prepared is not None:  # the whole flush committed: this runs once for it
            self.sparkplug.committed(prepared)
            for _, reason in prepared.dead_letters:
                metrics.DEAD_LETTERS.labels(metrics.reason_field(reason)).inc()
        done = time.time()
        metrics.READINGS_SUPERSEDED.inc(superseded)
        metrics.FLUSH_READINGS.observe(len(readings))
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        metrics.LAST_COMMIT.set(done)
        for msg in job.received:
            sent = msg.published_us / 1e6 if msg.published_us else msg.received_ns / 1e9
            metrics.COMMIT_LAG.observe(max(0.0, done - sent))

    async def _resolve(self, conn: asyncpg.Connection, job: FlushJob) -> npt.NDArray[np.int32]:
        """The sensor id of every channel of the flush, in arrival order, registering new
        sensors and units. A message naming a sensor its device has no room for becomes a dead
        letter. A message shaped like an earlier one (device, channel names, units) costs one
        look-up, not one per channel."""
        registry = self.registry
        parts: list[npt.NDArray[np.int32] | None] = []
        shapes = []
        sensors: dict[SensorKey, str | None] = {}
        latest: dict[SensorKey, int] = {}  # the latest reading time of each new sensor
        for item in job.accepted:
            names = tuple([ch.name for ch in item.batch.channels])
            units = tuple([ch.unit for ch in item.batch.channels])
            ids = registry.message_ids(item.levels, names, units)
            parts.append(ids)
            shapes.append((names, units))
            if ids is None:
                for ch in item.batch.channels:
                    key = SensorKey(item.levels, ch.name)
                    if ch.unit is not None or key not in sensors:
                        sensors[key] = ch.unit
                    if key not in registry:
                        t = int(ch.time.max())
                        latest[key] = max(t, latest.get(key, t))
        if sensors:
            refused = await registry.resolve(conn, sensors=sensors, latest=latest)
            if refused:
                self._refuse(job, refused)
                return await self._resolve(conn, job)  # all known now: one look-up each
            for i, item in enumerate(job.accepted):
                if parts[i] is None:
                    parts[i] = registry.remember(item.levels, *shapes[i])
            metrics.SENSORS_KNOWN.set(registry.used)
        done = [p for p in parts if p is not None]
        return np.concatenate(done) if done else np.empty(0, np.int32)

    def _refuse(self, job: FlushJob, refused: set[SensorKey]) -> None:
        """Turn the messages naming a refused sensor into dead letters, in place."""
        cap = self.cfg.limits.max_sensors_per_device
        kept = []
        for item in job.accepted:
            over = next(
                (c.name for c in item.batch.channels if SensorKey(item.levels, c.name) in refused),
                None,
            )
            if over is None or item.received is None:
                kept.append(item)
                continue
            msg = item.received
            reason = (
                f"sensor: device {'/'.join(item.levels)} already has {cap} sensors "
                f"(limits.max_sensors_per_device); {over!r} is not registered"
            )
            job.dead_letters.append(
                DeadLetter(
                    received_us=msg.received_ns // 1000,
                    topic=_clean(msg.topic) or "",
                    payload=msg.payload,
                    reason=_clean(reason) or reason,
                    content_type=_clean(msg.content_type),
                )
            )
            metrics.DEAD_LETTERS.labels(metrics.reason_field(reason)).inc()
        job.accepted = kept

    # ------------------------------------------------------------------ lifecycle

    async def _merge_seq(self, job: FlushJob) -> None:
        """The Sparkplug seq numbers of a committed flush, into the database (its own
        transaction, retried like the flush, before anything is acknowledged)."""
        if job.sparkplug_prepared is None:
            return
        try:
            await self.sparkplug.merge_seq(self.sinks[0].connection, job.sparkplug_prepared)
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                self.sinks[0].discard()
            raise classify(exc) from exc

    @staticmethod
    def _sparkplug_dead_letters(job: FlushJob) -> list[DeadLetter]:
        prepared = job.sparkplug_prepared
        if prepared is None:
            return []
        out = []
        for index, reason in prepared.dead_letters:
            msg = job.received[index]
            out.append(
                DeadLetter(
                    received_us=msg.received_ns // 1000,
                    topic=_clean(msg.topic) or "",
                    payload=msg.payload,
                    reason=reason,
                    content_type=_clean(msg.content_type),
                )
            )
        return out

    async def wait_for_database(self, stop: asyncio.Event) -> bool:
        """Connect, check the schema is current and load the registry in bulk, retrying until
        done or `stop` is set."""
        migrations = load_migrations(default_schema_dir())
        delay = self.cfg.db.retry_min_s
        while not stop.is_set():
            try:
                for sink in self.sinks:
                    await sink.connect()
                self.health.database = True
                conn = self.sinks[0].connection
                behind = await pending(conn, migrations=migrations)
                if not behind:
                    started = time.monotonic()
                    try:
                        await self.registry.load(conn)
                    except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
                        raise classify(exc) from exc
                    log.info(
                        "registry: %d sensors loaded in %.2fs",
                        len(self.registry),
                        time.monotonic() - started,
                    )
                    self.health.schema = True
                    return True
                log.warning(
                    "database schema is behind: %d migration(s) pending (%s); run 'ingest migrate'",
                    len(behind),
                    behind[0].name,
                )
            except TransientSinkError as exc:
                self.health.database = False
                log.warning("database not reachable, retrying in %.1fs: %s", delay, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, self.cfg.db.retry_max_s)
        return False

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Run until `stop` is set, then stop intake, flush, acknowledge and return.

        From the stop on, everything (leaving the share group, the final flush, the final
        rollup merge, closing the connections) takes at most flush.shutdown_grace_s, even with
        the database down. With a share group and `mqtt.leave_on_stop`, stopping first leaves
        the group (see `_leave`). `drain`: take over the session of `mqtt.client_id` without
        subscribing, ingest what the broker holds in it, end it and return (`ingest drain`).
        """
        if not await self.wait_for_database(stop):
            return
        cfg = self.cfg
        leave = drain or (bool(cfg.mqtt.share_group) and cfg.mqtt.leave_on_stop)
        if drain:
            await self.source.leave()  # the first connection unsubscribes instead
        async with self.source, asyncio.TaskGroup() as tg:
            writer = tg.create_task(self._writer(), name="writer")
            timer = tg.create_task(self._timer(), name="flush-timer")
            merger = None
            if self.cfg.rollups.enabled:
                merger = tg.create_task(self._merger(), name="rollup-merge")
            extras = []
            if self.rebirths is not None:
                extras.append(tg.create_task(self.rebirths.run(), name="sparkplug-rebirths"))
            if self.host is not None:
                extras.append(tg.create_task(self.host.run(), name="sparkplug-host"))
            intake = tg.create_task(self._intake(), name="intake")
            stopper = tg.create_task(stop.wait(), name="stop")
            alerts_stop = asyncio.Event()  # the alert evaluator and outbox dispatcher
            if cfg.alerts.enabled:
                start_alerts(tg, cfg=cfg, stop=alerts_stop)
            watch: set[asyncio.Task[Any]] = {writer, intake, stopper}
            drainer = None
            if drain:
                drainer = tg.create_task(self._empty_session(stop), name="drain")
                watch.add(drainer)
            await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
            loop = asyncio.get_running_loop()
            grace = cfg.flush.shutdown_grace_s
            deadline = loop.time() + grace
            emptied = False
            if drainer is not None:
                emptied = drainer.done() and drainer.result()
                drainer.cancel()
            elif leave and stop.is_set() and not writer.done() and not intake.done():
                # Leaving takes at most half the grace; the final flush has the rest.
                emptied = await self._leave(deadline=deadline - grace / 2)
            self.health.stopping = True
            intake.cancel()
            timer.cancel()
            if self.host is not None:
                await self.host.offline()
            for task in extras:
                task.cancel()
            stopper.cancel()
            self._stop_merging.set()  # a merge in progress finishes; no new one starts
            alerts_stop.set()
            if not writer.done():
                # Shield the final flush: a second signal during the grace period is ignored.
                await asyncio.shield(self._drain(writer, merger, deadline))
            if merger is not None and not merger.done():
                self._merge_sink.discard()  # the server rolls the merge back
                merger.cancel()
            if leave:
                await self._end_session(
                    emptied=emptied and writer.done() and self._idle(), deadline=deadline
                )
        for sink in [*self.sinks, self._merge_sink]:
            left = deadline - asyncio.get_running_loop().time()
            if left > 0:
                await sink.close(wait_s=min(5.0, left))
            else:
                sink.discard()

    def _idle(self) -> bool:
        """Nothing received is unacknowledged: no flush gathering, waiting or being written."""
        return (
            not self._job
            and self._queue.empty()
            and self._budget.messages == 0
            and self.source.queued == 0
        )

    async def _leave(self, *, deadline: float, stop: asyncio.Event | None = None) -> bool:
        """Leave the share group: UNSUBSCRIBE, then take in, commit and acknowledge what the
        broker still holds for this session until nothing arrives for `_QUIET_S`. True once
        the session is empty; False at `deadline`, when `stop` is set, or without an answer.
        """
        if not await self.source.leave():
            log.warning(
                "could not unsubscribe from %r; the session is kept", self.cfg.mqtt.topic_filter
            )
            return False
        log.info(
            "unsubscribed from %r; finishing what the broker holds for this session",
            self.cfg.mqtt.topic_filter,
        )
        loop = asyncio.get_running_loop()
        while loop.time() < deadline and not (stop is not None and stop.is_set()):
            if self._idle() and time.monotonic() - self._last_received >= _QUIET_S:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _empty_session(self, stop: asyncio.Event) -> bool:
        """`ingest drain`: wait for the first connection, then empty the session it found."""
        while self.source.session_present is None:
            if stop.is_set():
                return False
            await asyncio.sleep(0.05)
        client_id = self.cfg.mqtt.session_client_id
        if not self.source.session_present:
            log.info("the broker had no session for %r: nothing to drain", client_id)
            return True
        log.info("took over the session of %r; ingesting what it holds", client_id)
        return await self._leave(deadline=float("inf"), stop=stop)

    async def _end_session(self, *, emptied: bool, deadline: float) -> None:
        """End the broker-side session if it is known to be empty and every acknowledgement
        reached the broker by `deadline`; otherwise keep it, so that nothing it still holds is
        lost."""
        client_id = self.cfg.mqtt.session_client_id
        acked = False
        if emptied:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    acked = await self.source.flush_acks()
        if acked:
            self.source.end_session_on_close()
            self.session_ended = True
            metrics.SESSIONS_ENDED.inc()
            log.info("session of %r ended: it held nothing more", client_id)
            return
        log.warning(
            "session of %r kept: it may still hold messages; they are delivered when %r "
            "connects again, or run: ingest drain --client-id %s",
            client_id,
            client_id,
            client_id,
        )

    async def _drain(
        self, writer: asyncio.Task[None], merger: asyncio.Task[None] | None, deadline: float
    ) -> None:
        """Write what was received, then merge the rollups once more, all by `deadline`."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._dispatch()
                await self._queue.put(None)
                await asyncio.shield(writer)
                if merger is not None:
                    await asyncio.shield(merger)  # a merge in progress ends first
                    await self._merge_once()
        except TimeoutError:
            if writer.done():
                log.warning("final rollup merge not done in time; the next merge does it")
                return
            log.warning(
                "final flush not committed within %.0fs; its messages stay "
                "unacknowledged and the broker will deliver them again",
                self.cfg.flush.shutdown_grace_s,
            )
            writer.cancel()

    async def _merger(self) -> None:
        """Merge the pending rollup partials every rollups.merge_interval_s (own connection),
        until stopping."""
        while not self._stop_merging.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._stop_merging.wait(), timeout=self.cfg.rollups.merge_interval_s
                )
            if not self._stop_merging.is_set():
                await self._merge_once()

    async def _merge_once(self) -> None:
        sink = self._merge_sink
        try:
            if not sink.connected:
                await sink.connect()
            started = time.monotonic()
            merged = await merge_rollups(sink.connection)
            if merged:
                log.debug("merged %d rollup partials in %.2fs", merged, time.monotonic() - started)
        except (TransientSinkError, PermanentSinkError) as exc:
            log.warning("rollup merge skipped: %s", exc)
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                sink.discard()
            log.warning("rollup merge skipped, the next one retries: %s", classify(exc))


async def run_service(
    cfg: Config, *, stop: asyncio.Event | None = None, drain: bool = False
) -> int:
    """`ingest run`: warm the kernels, serve health and metrics, run until SIGTERM or SIGINT.

    `drain` (`ingest drain`): empty and end the session of `mqtt.client_id`, then return; 1 if
    stopped before the session was empty (it is then kept).
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = metrics.Health()
    pipeline = Pipeline(cfg, health=health)
    started = time.monotonic()
    pipeline.deriver.warm_up()
    if cfg.sparkplug.enabled:
        warm_up_sparkplug()
    memory.freeze_startup()
    log.info("kernels ready in %.2fs", time.monotonic() - started)
    failed: list[BaseException] = []
    async with metrics.serve(host=cfg.metrics.host, port=cfg.metrics.port, health=health):
        try:
            await pipeline.run(stop, drain=drain)
        except* (PermanentSinkError, ConfigError) as group:
            failed.extend(group.exceptions)
    if failed:
        # Nothing of the failed flush was acknowledged: the broker keeps it for the next start.
        log.error("stopped: %s", failed[0])
        return 1
    if drain and not pipeline.session_ended:
        log.error("stopped before the session was empty; it is kept")
        return 1
    log.info("stopped")
    return 0
