"""The ingester's broker-side session beyond taking messages: leaving a share group, emptying
a session for `ingest drain`, ending it when it holds nothing more, and unsubscribing from
filters the configuration no longer names (`ingest.db.subscriptions`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import asyncpg

from ingest import metrics
from ingest.config import Config
from ingest.db import subscriptions
from ingest.mqtt import MqttSource

log = logging.getLogger(__name__)

# Leaving a share group: the session is empty once everything received is acknowledged and
# nothing more arrived for this long after the broker confirmed the UNSUBSCRIBE.
_QUIET_S = 1.0


class BrokerSession:
    """`idle()`: nothing received is unacknowledged; `last_received()`: the monotonic time of
    the last message taken in. Both are the pipeline's."""

    def __init__(
        self,
        cfg: Config,
        source: MqttSource,
        *,
        idle: Callable[[], bool],
        last_received: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.source = source
        self._idle = idle
        self._last_received = last_received
        self.ended = False
        """Whether stopping ended the broker-side session (see `end`)."""

    async def forget_stale_filters(
        self, tg: asyncio.TaskGroup, conn: asyncpg.Connection
    ) -> list[asyncio.Task[None]]:
        """Record this session's filters before subscribing; the first connection unsubscribes
        from those recorded before that it no longer names, and they are then forgotten. `conn`
        must be free for the call (the writer task has not started yet)."""
        client_id = self.cfg.mqtt.session_client_id
        stale = await subscriptions.record(conn, client_id, self.source.topic_filters)
        if not stale:
            return []
        self.source.forget(stale)
        return [tg.create_task(self._forget_confirmed(), name="forget-filters")]

    async def _forget_confirmed(self) -> None:
        """Once the source confirms which stale filters the session no longer holds, forget
        them."""
        gone = await self.source.forgotten()
        if gone:
            await self._forget(gone)

    async def _forget(self, filters: list[str] | None) -> None:
        """Forget `filters` of this client id (None: all of them, the session ended)."""
        await subscriptions.forget_apart(
            filters,
            dsn=self.cfg.db.url,
            client_id=self.cfg.mqtt.session_client_id,
            timeout_s=self.cfg.db.connect_timeout_s,
        )

    async def leave(self, *, deadline: float, stop: asyncio.Event | None = None) -> bool:
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
            if self._idle() and time.monotonic() - self._last_received() >= _QUIET_S:
                return True
            await asyncio.sleep(0.05)
        return False

    async def empty(self, stop: asyncio.Event) -> bool:
        """`ingest drain`: wait for the first connection, then empty the session it found."""
        # session_present is known at the CONNACK; the connection is the source's only once it
        # has unsubscribed, and leaving before that finds none.
        while self.source.session_present is None or not self.source.connected:
            if stop.is_set():
                return False
            await asyncio.sleep(0.05)
        client_id = self.cfg.mqtt.session_client_id
        if not self.source.session_present:
            log.info("the broker had no session for %r: nothing to drain", client_id)
            return True
        log.info("took over the session of %r; ingesting what it holds", client_id)
        return await self.leave(deadline=float("inf"), stop=stop)

    async def end(self, *, emptied: bool, deadline: float) -> None:
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
            self.ended = True
            metrics.SESSIONS_ENDED.inc()
            log.info("session of %r ended: it held nothing more", client_id)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):  # no filter is left in the session
                    await self._forget(None)
            return
        log.warning(
            "session of %r kept: it may still hold messages; they are delivered when %r "
            "connects again, or run: ingest drain --client-id %s",
            client_id,
            client_id,
            client_id,
        )
