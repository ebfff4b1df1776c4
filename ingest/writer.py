"""The writer: each flush into the database, in transactions split over its connections, with
retries, like Telegraf's running output. Owns the connections and the flush metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Self

import asyncpg
import numpy as np
import numpy.typing as npt

from ingest import metrics
from ingest.config import Config
from ingest.db.migrate import default_schema_dir, load_migrations, pending
from ingest.db.registry import Message, Registry, SensorKey
from ingest.db.rollups import new_epoch
from ingest.db.sink import CLIENT_ERRORS, Readings, Sink, Upsert, classify
from ingest.derive import Derived, Deriver
from ingest.errors import InternalError, PermanentSinkError, TransientSinkError
from ingest.flush import FlushJob, build_readings, dead_letter, merge_sparkplug
from ingest.sparkplug.stage import SparkplugStage

__all__ = ["Writer"]

log = logging.getLogger(__name__)


def _kept(
    derive: Callable[[Readings], Derived], into: list[Derived]
) -> Callable[[Readings], Derived]:
    """`derive`, keeping what it returns in `into`."""

    def run(readings: Readings) -> Derived:
        derived = derive(readings)
        into.append(derived)
        return derived

    return run


def _server_pid(sink: Sink) -> int:
    """The server process of the sink's connection; 0 when it has none (nothing to doubt)."""
    return sink.connection.get_server_pid() if sink.connected else 0


def _derive_with(
    deriver: Deriver, upserts: Sequence[Upsert], *, skip_nan: bool
) -> Callable[[Readings], Derived]:
    """`deriver.derive` plus the Sparkplug births' writes, first, in the same transaction.
    With `skip_nan`, the stale rows of deaths (NaN) stay out of rollups and anomaly filters."""

    def derive(new: Readings) -> Derived:
        derived = deriver.derive(new.select(~np.isnan(new.value)) if skip_nan else new)
        return dataclasses.replace(derived, base=[*upserts, *derived.base])

    return derive


class Writer:
    """Writes flushes: resolves their sensors (registering new ones), assembles the readings,
    derives rollups and anomaly events, and commits, retrying transient database errors.

    Use as an async context manager: `connect` waits for the database; leaving closes the
    connections, by `deadline` if one is set (the pipeline sets it when stopping).
    `write` is called from one task at a time.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        registry: Registry,
        deriver: Deriver,
        sparkplug: SparkplugStage,
        health: metrics.Health,
    ) -> None:
        self._cfg = cfg
        self._registry = registry
        self._deriver = deriver
        self._sparkplug = sparkplug
        self._health = health
        self.sinks = [
            Sink(
                dsn=cfg.db.url,
                connect_timeout_s=cfg.db.connect_timeout_s,
                jit=False,
                # A redelivery comes within the session's expiry of the connection's loss.
                dead_letter_window_s=cfg.mqtt.session_expiry_s + 3600.0,
            )
            for _ in range(cfg.db.writers)
        ]
        self.deadline: float | None = None
        """Loop time by which leaving the context closes the connections (else 5 s each)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        for sink in self.sinks:
            left = 5.0 if self.deadline is None else self.deadline - loop.time()
            if left > 0:
                await sink.close(wait_s=min(5.0, left))
            else:
                sink.discard()

    async def write(self, job: FlushJob) -> None:
        """Write one flush, retrying transient database errors with capped backoff.

        The flush is split by sensor over the writer connections, each part in a transaction
        of its own, written at the same time; a part that committed is not written again.
        """
        delay = self._cfg.db.retry_min_s
        started = time.monotonic()
        written: set[int] = set()
        committed = False
        while True:
            try:
                if not committed:
                    await self.write_once(job, written, started)
                    committed = True
                await self._merge_seq(job)
                self._health.database = True
                return
            except TransientSinkError as exc:
                self._health.database = False
                metrics.DB_RETRIES.inc()
                log.warning(
                    "flush of %d messages not written, retrying in %.1fs: %s",
                    len(job.received),
                    delay,
                    exc,
                )
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._cfg.db.retry_max_s)
                for sink in self.sinks:
                    if not sink.connected:
                        with contextlib.suppress(TransientSinkError):
                            await sink.connect()

    async def write_once(self, job: FlushJob, written: set[int], started: float) -> None:
        """One attempt at `job`: the parts in `written` committed in an earlier attempt."""
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
                    job.sparkplug_prepared = await self._sparkplug.prepare(
                        conn,
                        items=job.sparkplug,
                        registry=self._registry,
                        now_us=time.time_ns() // 1000,
                    )
                readings, more = merge_sparkplug(readings, job.sparkplug_prepared.columns)
                superseded += more
            stage = "prepare"
            await self._deriver.prepare(conn, readings=readings)
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
        parts = max(1, min(len(self.sinks), len(readings) // self._cfg.db.split_min_readings))
        prepared = job.sparkplug_prepared
        births = prepared.upserts if prepared is not None else []
        dead_letters = job.dead_letters
        if prepared is not None and prepared.dead_letters:
            held = [dead_letter(job.received[i], reason) for i, reason in prepared.dead_letters]
            dead_letters = [*dead_letters, *held]
        derive0: Callable[[Readings], Derived] = self._deriver.derive
        if prepared is not None and (births or prepared.stale_rows):
            derive0 = _derive_with(self._deriver, births, skip_nan=prepared.stale_rows > 0)
        if births:
            parts = 1  # a birth's aliases commit in the transaction of its readings
        slabs = self._deriver.split(readings, parts)
        todo = [
            p
            for p in range(parts)
            if p not in written and (len(slabs[p]) or (p == 0 and (dead_letters or births)))
        ]
        # What each part derived, and its connection's server process: a part whose commit
        # went unheard leaves journal rows that may have committed (`Deriver.in_doubt`).
        made: dict[int, list[Derived]] = {p: [] for p in todo}
        pids = {p: _server_pid(self.sinks[p]) for p in todo}
        outcomes = await asyncio.gather(
            *(
                self.sinks[p].write(
                    readings=slabs[p],
                    dead_letters=dead_letters if p == 0 else (),
                    derive=_kept(derive0 if p == 0 else self._deriver.derive, made[p]),
                    settle=self._deriver.settle,
                )
                for p in todo
            ),
            return_exceptions=True,
        )
        failure: BaseException | None = None
        for p, outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                if isinstance(outcome.__cause__, CLIENT_ERRORS):
                    self._deriver.in_doubt(pids[p], made[p])
                continue
            result, derived = outcome
            written.add(p)
            self._deriver.commit(derived)
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
            self._sparkplug.committed(prepared)
            for _, reason in prepared.dead_letters:
                metrics.DEAD_LETTERS.labels(metrics.reason_field(reason)).inc()
        done = time.time()
        metrics.READINGS_SUPERSEDED.inc(superseded)
        metrics.FLUSH_READINGS.observe(len(readings))
        metrics.FLUSH_SECONDS.observe(time.monotonic() - started)
        metrics.LAST_COMMIT.set(done)
        # Publication times in µs: the publisher's clock where it gave one, else receipt.
        sent = np.array([m.published_us or m.received_ns // 1000 for m in job.received], np.float64)
        metrics.COMMIT_LAG.observe_many(np.maximum(done - sent / 1e6, 0.0))

    async def _resolve(self, conn: asyncpg.Connection, job: FlushJob) -> npt.NDArray[np.int32]:
        """The sensor id of every channel of the flush, in arrival order, registering new
        sensors and units. A message naming a sensor its device has no room for becomes a dead
        letter. A message shaped like an earlier one (device, channel names, units) costs one
        look-up, not one per channel."""
        registry = self._registry
        version = registry.units_version
        if job.columns is not None:  # every message a shaped payload: usually all known
            known = [
                x.ids
                for item in job.accepted
                if item.shaped is not None
                and (x := item.shaped.shape).version == version
                and x.ids is not None
            ]
            if known and len(known) == len(job.accepted):
                return np.concatenate(known)
        parts: list[npt.NDArray[np.int32] | None] = []
        shapes = []
        unresolved: list[Message] = []
        for i, item in enumerate(job.accepted):
            names, units = item.names, item.units
            shape = None if item.shaped is None else item.shaped.shape
            if shape is not None and shape.version == version:
                ids = shape.ids  # its sensors, as resolved for an earlier payload of its shape
            else:
                ids = registry.message_ids(item.levels, names, units)
                if ids is not None and shape is not None:
                    shape.ids, shape.version = ids, version
            parts.append(ids)
            shapes.append((names, units))
            if ids is None:
                batch = job.batch(i)
                if batch.readings == len(names):  # a reading a channel: its latest
                    ends = batch.time.tolist()
                else:
                    counts = np.array(batch.counts, dtype=np.int64)
                    ends = np.maximum.reduceat(batch.time, np.cumsum(counts) - counts).tolist()
                unresolved.append((item.levels, names, units, ends))
        if unresolved:
            refused = await registry.resolve_messages(conn, messages=unresolved)
            if refused:
                self._refuse(job, refused)
                return await self._resolve(conn, job)  # all known now: one look-up each
            for i, item in enumerate(job.accepted):
                if parts[i] is None:
                    parts[i] = ids = registry.remember(item.levels, *shapes[i])
                    if item.shaped is not None:
                        item.shaped.shape.ids = ids
                        item.shaped.shape.version = registry.units_version
            metrics.SENSORS_KNOWN.set(registry.used)
        done = [p for p in parts if p is not None]
        return np.concatenate(done) if done else np.empty(0, np.int32)

    def _refuse(self, job: FlushJob, refused: set[SensorKey]) -> None:
        """Turn the messages naming a refused sensor into dead letters, in place."""
        cap = self._cfg.limits.max_sensors_per_device
        job.drop_columns()  # they hold the refused messages' readings too
        kept = []
        for item in job.accepted:
            over = next(
                (name for name in item.names if SensorKey(item.levels, name) in refused),
                None,
            )
            if over is None or item.received is None:
                kept.append(item)
                continue
            reason = (
                f"sensor: device {'/'.join(item.levels)} already has {cap} sensors "
                f"(limits.max_sensors_per_device); {over!r} is not registered"
            )
            job.reject(item.received, reason)
        job.accepted = kept

    async def _merge_seq(self, job: FlushJob) -> None:
        """The Sparkplug seq numbers of a committed flush, into the database (its own
        transaction, retried like the flush, before anything is acknowledged)."""
        if job.sparkplug_prepared is None:
            return
        try:
            await self._sparkplug.merge_seq(self.sinks[0].connection, job.sparkplug_prepared)
        except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
            if not isinstance(exc, asyncpg.PostgresError):
                self.sinks[0].discard()
            raise classify(exc) from exc

    async def connect(self, stop: asyncio.Event) -> bool:
        """Connect, check the schema is current and load the registry in bulk, retrying until
        done or `stop` is set."""
        migrations = load_migrations(default_schema_dir())
        delay = self._cfg.db.retry_min_s
        while not stop.is_set():
            try:
                for sink in self.sinks:
                    await sink.connect()
                self._health.database = True
                conn = self.sinks[0].connection
                behind = await pending(conn, migrations=migrations)
                if not behind:
                    started = time.monotonic()
                    try:
                        await self._registry.load(conn)
                        journal = self._deriver.journal
                        if self._cfg.rollups.enabled and journal.epoch is None:
                            journal.epoch = await new_epoch(conn)
                    except (asyncpg.PostgresError, *CLIENT_ERRORS) as exc:
                        raise classify(exc) from exc
                    log.info(
                        "registry: %d sensors loaded in %.2fs",
                        len(self._registry),
                        time.monotonic() - started,
                    )
                    self._health.schema = True
                    return True
                log.warning(
                    "database schema is behind: %d migration(s) pending (%s); run 'ingest migrate'",
                    len(behind),
                    behind[0].name,
                )
            except TransientSinkError as exc:
                self._health.database = False
                log.warning("database not reachable, retrying in %.1fs: %s", delay, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)
            delay = min(delay * 2, self._cfg.db.retry_max_s)
        return False
