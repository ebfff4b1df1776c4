"""`ingest run` and `ingest drain` as a process: signals, kernels warmed up, the health and
metrics server, the pipeline run to its end, the exit status."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from ingest import memory, metrics
from ingest.config import Config
from ingest.errors import ConfigError, PermanentSinkError
from ingest.pipeline import Pipeline
from ingest.warmup import warm_up

# The pipeline's log name, as operators filter it, whatever the module layout.
log = logging.getLogger("ingest.pipeline")


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
    warm_up(sparkplug=cfg.sparkplug.enabled)
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
    if drain and not pipeline.session.ended:
        log.error("stopped before the session was empty; it is kept")
        return 1
    log.info("stopped")
    return 0
