"""The pipeline: wires source, decode, registry, kernels and sink, and acknowledges after commit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import asyncpg
import numpy as np

from ingest import memory, metrics
from ingest.config import Config, parse_rfc3339_us
from ingest.decode import Batch, DecodeLimits, decode_batch, parse_topic
from ingest.derive import Deriver
from ingest.errors import ConfigError, PayloadError, PermanentSinkError, TransientSinkError
from ingest.kernels import check_sorted, gather
from ingest.migrate import default_schema_dir, load_migrations, pending
from ingest.registry import Registry, SensorKey
from ingest.sink import DeadLetter, Readings, Sink, classify
from ingest.source import MqttSource, Received, Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Accepted:
    levels: tuple[str, ...]
    batch: Batch


@dataclass(slots=True)
class FlushJob:
    """Messages gathered for one flush, in arrival order."""

    received: list[Received] = field(default_factory=list)
    accepted: list[_Accepted] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    readings: int = 0
    nbytes: int = 0

    def __bool__(self) -> bool:
        return bool(self.received)


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


def build_readings(job: FlushJob, sensor_ids: Sequence[int | None]) -> tuple[Readings, int]:
    """The flush's readings as columns sorted by (sensor, time); for a repeated (sensor, time)
    the reading that arrived last wins. Returns the columns and how many were superseded.
    `sensor_ids` holds the id of every channel's sensor, in arrival order.

    Channels usually hold rising times, and a sensor's channels from later messages start
    after the earlier ones end: then gathering whole channels in (sensor, first time) order
    sorts the flush, which one linear check confirms. Anything else takes a stable sort of
    every reading.
    """
    batches = [item.batch for item in job.accepted]
    if not sensor_ids:
        empty = Readings(
            np.empty(0, np.int64),
            np.empty(0, np.int32),
            np.empty(0, np.float64),
            np.empty(0, np.uint8),
        )
        return empty, 0
    assert None not in sensor_ids, "resolve() registers every sensor of the flush first"
    sensor = np.array(sensor_ids, dtype=np.int32)  # per channel, in arrival order
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


def _clean(text: str | None) -> str | None:
    """PostgreSQL text cannot hold NUL; keep everything else as received."""
    return None if text is None else text.replace("\x00", "\\x00")


class Pipeline:
    """One ingester: intake task, flush timer and writer task under one TaskGroup."""

    def __init__(self, cfg: Config, *, health: metrics.Health) -> None:
        self.cfg = cfg
        self.health = health
        self.registry = Registry()
        self.deriver = Deriver(
            rules=cfg.anomaly.rules, rollups=cfg.rollups.enabled, registry=self.registry
        )
        self.sinks = [
            Sink(dsn=cfg.db.url, connect_timeout_s=cfg.db.connect_timeout_s)
            for _ in range(cfg.db.writers)
        ]
        self.source = MqttSource(
            settings=_source_settings(cfg), on_reconnect=metrics.MQTT_RECONNECTS.inc
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
        self._queue: asyncio.Queue[FlushJob | None] = asyncio.Queue(maxsize=1)
        self._writer_idle = False
        self._dispatch_lock = asyncio.Lock()

    # ------------------------------------------------------------------ intake

    def _accept(self, msg: Received) -> None:
        """Decode one message into the current flush, or make it a dead letter. Never awaits."""
        job = self._job
        if not job:
            self._job_started = time.monotonic()
        job.received.append(msg)
        job.nbytes += len(msg.payload)
        metrics.MESSAGES_RECEIVED.inc()
        metrics.PAYLOAD_BYTES.inc(len(msg.payload))
        try:
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
        job.accepted.append(_Accepted(levels, batch))
        job.readings += batch.readings
        self._budget.take(nbytes=len(msg.payload), readings=batch.readings)

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
            if self._queue.empty() and self._job:
                await self._dispatch()  # what gathered while the last flush was written
            self._writer_idle = True
            job = await self._queue.get()
            self._writer_idle = False
            if job is None:
                return
            await self._commit(job)
            for msg in job.received:
                self.source.ack(msg.token)
            metrics.MESSAGES_ACKED.inc(len(job.received))
            await self._budget.release(
                nbytes=job.nbytes, readings=job.readings, messages=len(job.received)
            )

    async def _commit(self, job: FlushJob) -> None:
        """Write one flush, retrying transient database errors with capped backoff.

        The flush is split by sensor over the writer connections, each part in a transaction
        of its own, written at the same time; a part that committed is not written again.
        """
        delay = self.cfg.db.retry_min_s
        started = time.monotonic()
        written: set[int] = set()
        while True:
            try:
                await self._try_commit(job, written, started)
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
        keys = channel_keys(job)
        units = (ch.unit for item in job.accepted for ch in item.batch.channels)
        sensors: dict[SensorKey, str | None] = {}
        for key, unit in zip(keys, units, strict=True):
            if unit is not None or key not in sensors:
                sensors[key] = unit
        try:
            await self.registry.resolve(conn, sensors=sensors)
            metrics.SENSORS_KNOWN.set(len(self.registry))
            ids = [self.registry.get(key) for key in keys]
            readings, superseded = build_readings(job, ids)
            await self.deriver.prepare(conn, readings=readings)
        except (PermanentSinkError, TransientSinkError):
            raise
        except Exception as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                self.sinks[0].discard()  # its state is unknown after a client-side error
            raise classify(exc) from exc
        # Split only into parts of at least db.split_min_readings: for a small flush a second
        # transaction costs more than writing in parallel saves.
        parts = max(1, min(len(self.sinks), len(readings) // self.cfg.db.split_min_readings))
        slabs = [readings]
        if parts > 1:
            part_of = readings.sensor % parts
            slabs = [readings.select(part_of == p) for p in range(parts)]
        todo = [
            p
            for p in range(parts)
            if p not in written and (len(slabs[p]) or (p == 0 and job.dead_letters))
        ]
        outcomes = await asyncio.gather(
            *(
                self.sinks[p].write(
                    readings=slabs[p],
                    dead_letters=job.dead_letters if p == 0 else (),
                    derive=self.deriver.derive,
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
        done = time.time()
        metrics.READINGS_SUPERSEDED.inc(superseded)
        metrics.FLUSH_READINGS.observe(len(readings))
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        metrics.LAST_COMMIT.set(done)
        for msg in job.received:
            sent = msg.published_us / 1e6 if msg.published_us else msg.received_ns / 1e9
            metrics.COMMIT_LAG.observe(max(0.0, done - sent))

    # ------------------------------------------------------------------ lifecycle

    async def wait_for_database(self, stop: asyncio.Event) -> bool:
        """Connect and check the schema is current, retrying until it is or `stop` is set."""
        migrations = load_migrations(default_schema_dir())
        delay = self.cfg.db.retry_min_s
        while not stop.is_set():
            try:
                for sink in self.sinks:
                    await sink.connect()
                self.health.database = True
                behind = await pending(self.sinks[0].connection, migrations=migrations)
                if not behind:
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

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then stop intake, flush, acknowledge and return."""
        if not await self.wait_for_database(stop):
            return
        async with self.source, asyncio.TaskGroup() as tg:
            writer = tg.create_task(self._writer(), name="writer")
            timer = tg.create_task(self._timer(), name="flush-timer")
            intake = tg.create_task(self._intake(), name="intake")
            stopper = tg.create_task(stop.wait(), name="stop")
            alerts_stop = asyncio.Event()  # alerts: evaluator and outbox dispatcher (ingest/alerts)
            if self.cfg.alerts.enabled:
                from ingest.alerts.service import start as start_alerts

                start_alerts(tg, cfg=self.cfg, stop=alerts_stop)
            await asyncio.wait({writer, intake, stopper}, return_when=asyncio.FIRST_COMPLETED)
            self.health.stopping = True
            intake.cancel()
            timer.cancel()
            stopper.cancel()
            alerts_stop.set()
            if not writer.done():
                # Shield the final flush: a second signal during the grace period is ignored.
                await asyncio.shield(self._drain(writer))
        for sink in self.sinks:
            await sink.close()

    async def _drain(self, writer: asyncio.Task[None]) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._dispatch()
        await self._queue.put(None)
        try:
            await asyncio.wait_for(asyncio.shield(writer), timeout=self.cfg.flush.shutdown_grace_s)
        except TimeoutError:
            log.warning(
                "final flush not committed within %.0fs; its messages stay "
                "unacknowledged and the broker will deliver them again",
                self.cfg.flush.shutdown_grace_s,
            )
            writer.cancel()


def _source_settings(cfg: Config) -> Settings:
    m = cfg.mqtt
    return Settings(
        url=m.url,
        client_id=cfg.client_id,
        topic_prefix=m.topic_prefix,
        share_group=m.share_group or None,
        receive_maximum=m.receive_maximum,
        session_expiry_s=m.session_expiry_s,
        keepalive_s=m.keepalive_s,
        tls_ca_file=m.tls_ca_file or None,
        tls_cert_file=m.tls_cert_file or None,
        tls_key_file=m.tls_key_file or None,
        tls_insecure=m.tls_insecure,
        reconnect_min_s=m.reconnect_min_s,
        reconnect_max_s=m.reconnect_max_s,
    )


async def run_service(cfg: Config, *, stop: asyncio.Event | None = None) -> int:
    """`ingest run`: warm the kernels, serve health and metrics, run until SIGTERM or SIGINT."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    health = metrics.Health()
    pipeline = Pipeline(cfg, health=health)
    started = time.monotonic()
    pipeline.deriver.warm_up()
    memory.freeze_startup()
    log.info("kernels ready in %.2fs", time.monotonic() - started)
    failed: list[BaseException] = []
    async with metrics.serve(host=cfg.metrics.host, port=cfg.metrics.port, health=health):
        try:
            await pipeline.run(stop)
        except* (PermanentSinkError, ConfigError) as group:
            failed.extend(group.exceptions)
    if failed:
        # Nothing of the failed flush was acknowledged: the broker keeps it for the next start.
        log.error("stopped: %s", failed[0])
        return 1
    log.info("stopped")
    return 0
