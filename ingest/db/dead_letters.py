"""Dead letters: rejected messages stored with their reason, each message once."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

# Advisory locks (LOCK_CLASS, digest's first 4 bytes) taken in the flush transaction, in order,
# so that two ingesters given the same message at once store it once.
LOCK_CLASS = 0x646C7472  # "dltr"

_LOCK = "SELECT count(pg_advisory_xact_lock($1::int, k)) FROM unnest($2::int[]) AS k"
# Rows whose digest is already stored within the window, or repeated in the flush, are skipped;
# the window's start is a plain parameter so that only its chunks are planned.
_INSERT = """
INSERT INTO telemetry.dead_letters (received_at, topic, payload, reason, content_type, digest)
SELECT DISTINCT ON (d.digest) d.received_at, d.topic, d.payload, d.reason, d.content_type, d.digest
  FROM unnest($1::timestamptz[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::bytea[])
       AS d(received_at, topic, payload, reason, content_type, digest)
 WHERE NOT EXISTS (SELECT 1 FROM telemetry.dead_letters x
                    WHERE x.digest = d.digest AND x.received_at >= $7)
 ORDER BY d.digest, d.received_at
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A rejected message, stored with the reason it was rejected."""

    received_us: int
    topic: str
    payload: bytes
    reason: str
    content_type: str | None

    @property
    def digest(self) -> bytes:
        """What identifies the message: SHA-256 of its topic, content type and payload."""
        h = hashlib.sha256()
        for part in (self.topic.encode(), (self.content_type or "").encode()):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part)
        h.update(self.payload)
        return h.digest()


async def write_dead_letters(
    conn: asyncpg.Connection, letters: Sequence[DeadLetter], *, window_s: float
) -> None:
    """Store `letters` in the caller's transaction, skipping any message already stored as a
    dead letter received within `window_s` before the oldest of them."""
    if not letters:
        return
    digests = [d.digest for d in letters]
    keys = sorted({int.from_bytes(g[:4], "big", signed=True) for g in digests})
    await conn.fetchval(_LOCK, LOCK_CLASS, keys)
    received = [_to_datetime(d.received_us) for d in letters]
    since = min(received) - timedelta(seconds=window_s)
    await conn.execute(
        _INSERT,
        received,
        [d.topic for d in letters],
        [d.payload for d in letters],
        [d.reason for d in letters],
        [d.content_type for d in letters],
        digests,
        since,
    )


def _to_datetime(us: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us)
