"""SUBSCRIBE and UNSUBSCRIBE as the source uses them: every configured filter in one packet, and
the filters an earlier configuration left in the session taken out."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from ingest.mqtt.connection import Connection
from ingest.mqtt.refusals import check_suback

__all__ = ["subscribe", "unsubscribe_stale"]

logger = logging.getLogger("ingest.source")

# QoS 1; retained messages only when the subscription is new (retain handling 1).
_SUBSCRIBE_OPTIONS: Final = 0x01 | 0x10
# Further filters (Sparkplug's): QoS 1, never the broker's retained messages (retain handling
# 2; Sparkplug retains only STATE, which the service ignores).
_EXTRA_OPTIONS: Final = 0x01 | 0x20


async def subscribe(conn: Connection, topic_filter: str, extra_filters: Sequence[str]) -> None:
    """Subscribe to the prefix's filter and the extra ones; `ConfigError` if refused."""
    # One SUBSCRIBE for every filter: a resumed session's backlog may already be streaming
    # in, and each answer waits behind it.
    pairs = [(topic_filter, _SUBSCRIBE_OPTIONS)]
    pairs += [(f, _EXTRA_OPTIONS) for f in extra_filters]
    codes, reason = await conn.subscribe(pairs)
    check_suback(pairs, codes, reason)


async def unsubscribe_stale(
    conn: Connection, stale: list[str], broker: str, client_id: str
) -> list[str]:
    """Unsubscribe from `stale`; the filters the session no longer holds (all of them when
    the broker found no session)."""
    if not conn.session_present:
        return stale  # no session: it holds no subscription
    codes, reason = await conn.unsubscribe(stale)
    # 0x00 success, 0x11 no subscription existed: either way none is left.
    gone = [f for f, code in zip(stale, codes, strict=True) if code in (0x00, 0x11)]
    if len(gone) < len(stale):
        logger.warning(
            "MQTT broker %s refused to unsubscribe %r from %r (reason codes %s%s); "
            "its session keeps them until it expires",
            broker,
            client_id,
            [f for f in stale if f not in gone],
            [f"0x{c:02x}" for c in codes],
            f", {reason}" if reason else "",
        )
    if gone:
        logger.info("MQTT unsubscribed from %r: no longer configured", gone)
    return gone
