"""Starts the alert evaluator and the outbox dispatcher inside the pipeline's TaskGroup."""

from __future__ import annotations

import asyncio

from ingest.alerts.evaluator import Evaluator
from ingest.alerts.outbox import Dispatcher
from ingest.config import Config


def start(tg: asyncio.TaskGroup, *, cfg: Config, stop: asyncio.Event) -> None:
    """Run both tasks on their own connections until `stop` is set.

    Their errors are retried inside; nothing they do holds up intake or flushes.
    """
    alerting = [r.alert for r in cfg.anomaly.rules] + [r.alert for r in cfg.anomaly.assets]
    if cfg.alerts.silence_s > 0 or any(a is not None for a in alerting):
        evaluator = Evaluator(
            rules=cfg.anomaly.rules, settings=cfg.alerts, assets=cfg.anomaly.assets
        )
        tg.create_task(evaluator.run(dsn=cfg.db.url, stop=stop), name="alert-evaluator")
    if cfg.alerts.sinks:
        dispatcher = Dispatcher(settings=cfg.alerts)
        tg.create_task(dispatcher.run(dsn=cfg.db.url, stop=stop), name="alert-dispatcher")
