"""The pipeline: wires the MQTT source, decoding, the flush, the writer and the rollup merger;
acknowledges every message after its flush committed. The process around it (`ingest run`) is
``ingest.service``."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ingest import metrics
from ingest.alerts.service import start as start_alerts
from ingest.config import Config, parse_rfc3339_us
from ingest.db.registry import Registry
from ingest.db.rollups import RollupMerger
from ingest.decode import DecodeLimits
from ingest.derive import Deriver
from ingest.errors import PayloadError
from ingest.flush import Accepted, Carried, FlushJob, carry_held
from ingest.memory import InflightBudget
from ingest.mqtt import MqttSource, Received
from ingest.session import BrokerSession
from ingest.shapes import Shaped, Shapes
from ingest.sparkplug.commands import HostApplication, RebirthRequester
from ingest.sparkplug.stage import SparkplugStage
from ingest.sparkplug.topic import is_sparkplug
from ingest.writer import Writer

log = logging.getLogger(__name__)


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
            rules=cfg.anomaly.rules,
            assets=cfg.anomaly.assets,
            rollups=cfg.rollups.enabled,
            registry=self.registry,
            replay_max_s=cfg.anomaly.replay_max_s,
            floor_us=parse_rfc3339_us(cfg.limits.min_time),
        )
        self.writer = Writer(
            cfg,
            registry=self.registry,
            deriver=self.deriver,
            sparkplug=self.sparkplug,
            health=health,
        )
        self.merger = RollupMerger(
            dsn=cfg.db.url,
            connect_timeout_s=cfg.db.connect_timeout_s,
            interval_s=cfg.rollups.merge_interval_s,
            journal=self.deriver.journal,
        )
        self.source = MqttSource(
            settings=cfg.mqtt,
            extra_filters=cfg.sparkplug.topic_filters(),
            max_payload_bytes=cfg.limits.max_payload_bytes,
            # What waits unread in the source counts towards memory as much as what is in flight.
            max_queued_bytes=cfg.flush.max_inflight_bytes // 16,
            on_reconnect=metrics.MQTT_RECONNECTS.inc,
        )
        self.limits = DecodeLimits(
            max_payload_bytes=cfg.limits.max_payload_bytes,
            max_readings=cfg.limits.max_batch_readings,
            min_time_us=parse_rfc3339_us(cfg.limits.min_time),
            max_future_us=int(cfg.limits.max_future_s * 1_000_000),
        )
        self.shapes = Shapes(prefix=cfg.mqtt.topic_prefix)
        self._sparkplug_enabled = cfg.sparkplug.enabled
        self._received = 0  # messages and payload bytes not counted in the metrics yet
        self._received_bytes = 0
        self._budget = InflightBudget(
            max_bytes=cfg.flush.max_inflight_bytes, max_readings=cfg.flush.max_inflight_readings
        )
        self._job = FlushJob()
        self._job_started = 0.0
        self._last_received = time.monotonic()
        self._queue: asyncio.Queue[FlushJob | None] = asyncio.Queue(maxsize=1)
        self._writer_idle = False
        self._dispatch_lock = asyncio.Lock()
        self.session = BrokerSession(
            cfg, self.source, idle=self._idle, last_received=lambda: self._last_received
        )

    # ------------------------------------------------------------------ intake

    def _accept(self, msg: Received) -> None:
        """Decode one message into the current flush, or make it a dead letter. Never awaits."""
        job = self._job
        self._last_received = time.monotonic()
        if not job:
            self._job_started = self._last_received
        job.received.append(msg)
        job.nbytes += len(msg.payload)
        self._received += 1
        self._received_bytes += len(msg.payload)
        try:
            if self._sparkplug_enabled and is_sparkplug(msg.topic):
                self._accept_sparkplug(msg, job)
                return
            levels, got = self.shapes.accept(
                msg.topic,
                msg.payload,
                content_type=msg.content_type,
                limits=self.limits,
                now_us=time.time_ns() // 1000,
            )
        except PayloadError as exc:
            job.reject(msg, exc.reason)
            self._budget.take(nbytes=len(msg.payload), readings=0)
            return
        if isinstance(got, Shaped):  # read with the rest of the flush (`_settle`)
            job.accepted.append(Accepted(levels, None, msg, got))
        else:
            job.accepted.append(Accepted(levels, got, msg))
        readings = got.readings
        job.readings += readings
        self._budget.take(nbytes=len(msg.payload), readings=readings)

    def _settle(self, job: FlushJob) -> None:
        """Read the flush's shaped payloads, all at once; one whose bytes differ from its
        shape is decoded in full, or becomes a dead letter. Its readings stay counted as the
        in-flight budget took them (released with the flush)."""
        waiting = [item for item in job.accepted if item.batch is None]
        if not waiting:
            return
        settled = self.shapes.settle([item.shaped for item in waiting if item.shaped])
        if settled.complete and len(waiting) == len(job.accepted):
            job.columns = settled  # the usual case: batches only if asked for
            return
        for i, item in enumerate(waiting):
            item.batch = settled.batch(i)
            msg, shaped = item.received, item.shaped
            if item.batch is not None or msg is None or shaped is None:
                continue
            try:
                _, item.batch = self.shapes.fallback(
                    msg.topic,
                    shaped,
                    content_type=msg.content_type,
                    limits=self.limits,
                    now_us=time.time_ns() // 1000,
                )
                item.shaped = None
            except PayloadError as exc:
                job.reject(msg, exc.reason)
        job.accepted = [item for item in job.accepted if item.batch is not None]

    def _take_job(self) -> FlushJob:
        """The flush gathered so far, settled, for the writer; a new one starts."""
        job, self._job = self._job, FlushJob()
        self._settle(job)
        return job

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

    def _count_received(self) -> None:
        """The messages received since the last call, into the metrics (once per flush, not
        per message)."""
        if self._received:
            metrics.MESSAGES_RECEIVED.inc(self._received)
            metrics.PAYLOAD_BYTES.inc(self._received_bytes)
            self._received = self._received_bytes = 0

    async def _dispatch(self) -> None:
        """Hand the current flush to the writer (waits while the writer is behind)."""
        self._count_received()
        async with self._dispatch_lock:
            if not self._job:
                return
            await self._queue.put(self._take_job())

    async def _intake(self) -> None:
        # A flush goes to the writer when it is full, or at once when the writer is idle: under
        # load, flushes grow with what gathers while the previous one is written; at low rates,
        # nothing waits for a timer.
        # What the connection holds already is taken without a coroutine per message.
        max_readings = self.cfg.flush.max_readings
        async for first in self.source.messages():
            msg: Received | None = first
            while msg is not None:
                self._accept(msg)
                if self._job.readings >= max_readings or self._writer_idle:
                    await self._dispatch()
                if not self._budget.has_room():
                    await self._budget.wait_for_room()
                msg = self.source.ready()

    async def _timer(self) -> None:
        interval = self.cfg.flush.interval_s
        while True:
            await asyncio.sleep(interval / 4)
            self._count_received()
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
                job = self._take_job()
            await self.writer.write(job)
            carried = self._carry(job)
            # Only what the current connection takes: after a reconnect the broker delivers
            # the others again, and they are counted when those copies are acknowledged.
            received = job.received
            if carried.indices:
                received = [m for i, m in enumerate(received) if i not in carried.indices]
            acked = self.source.ack_all([msg.token for msg in received])
            metrics.MESSAGES_ACKED.inc(acked)
            await self._budget.release(
                nbytes=job.nbytes - carried.nbytes,
                readings=job.readings - carried.readings,
                messages=len(job.received) - len(carried.indices),
            )

    def _carry(self, job: FlushJob) -> Carried:
        """Move the messages a committed flush held back (Sparkplug DATA waiting for a birth)
        into the flush being gathered: unacknowledged, and in flight still."""
        if not self._job:
            self._job_started = time.monotonic()  # tried again after flush.interval_s
        return carry_held(job, self._job)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event, *, drain: bool = False) -> None:
        """Run until `stop` is set, then stop intake, flush, acknowledge and return.

        From the stop on, everything (leaving the share group, the final flush, the final
        rollup merge, closing the connections) takes at most flush.shutdown_grace_s, even with
        the database down. With a share group and `mqtt.leave_on_stop`, stopping first leaves
        the group (see `_leave`). `drain`: take over the session of `mqtt.client_id` without
        subscribing, ingest what the broker holds in it, end it and return (`ingest drain`).
        """
        cfg = self.cfg
        leave = drain or (bool(cfg.mqtt.share_group) and cfg.mqtt.leave_on_stop)
        if drain:
            await self.source.leave()  # the first connection unsubscribes instead
        async with self.writer, self.source, asyncio.TaskGroup() as tg:
            if not await self.writer.connect(stop):
                return
            extras = []
            if not drain:  # a drain subscribes to nothing, and ends the session
                extras += await self.session.forget_stale_filters(
                    tg, self.writer.sinks[0].connection
                )
            writer = tg.create_task(self._writer(), name="writer")
            timer = tg.create_task(self._timer(), name="flush-timer")
            merger = None
            if self.cfg.rollups.enabled:
                merger = tg.create_task(self.merger.run(), name="rollup-merge")
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
                drainer = tg.create_task(self.session.empty(stop), name="drain")
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
                emptied = await self.session.leave(deadline=deadline - grace / 2)
            self.health.stopping = True
            intake.cancel()
            timer.cancel()
            if self.host is not None:
                await self.host.offline()
            for task in extras:
                task.cancel()
            stopper.cancel()
            self.merger.stop()  # a merge in progress finishes; no new one starts
            alerts_stop.set()
            if not writer.done():
                # Shield the final flush: a second signal during the grace period is ignored.
                await asyncio.shield(self._drain(writer, merger, deadline))
            if merger is not None and not merger.done():
                self.merger.abort()  # the server rolls the merge back
                merger.cancel()
            self.writer.deadline = deadline
            if leave:
                await self.session.end(
                    emptied=emptied and writer.done() and self._idle(), deadline=deadline
                )
        await self.merger.close(wait_s=deadline - asyncio.get_running_loop().time())

    def _idle(self) -> bool:
        """Nothing received is unacknowledged: no flush gathering, waiting or being written."""
        return (
            not self._job
            and self._queue.empty()
            and self._budget.messages == 0
            and self.source.queued == 0
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
                    await self.merger.merge_once()
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
