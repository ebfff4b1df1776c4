"""The error hierarchy: one root, split by who is at fault and whether a retry can help."""

from __future__ import annotations


class IngestError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(IngestError):
    """The configuration is wrong; the message names the key. Fix the config, do not retry."""


class PayloadError(IngestError):
    """A message breaks the wire format; the message is a one-line reason naming the field.

    Never retried: the message becomes a dead letter and is acknowledged.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SinkError(IngestError):
    """Writing to the database failed."""


class TransientSinkError(SinkError):
    """The database is unreachable, restarting or overloaded: retry with backoff."""


class PermanentSinkError(SinkError):
    """The database refused the write for a reason a retry will not fix (privileges, schema)."""


class MigrationError(IngestError):
    """The schema cannot be brought up to date (a changed migration, a failed statement)."""


class InternalError(IngestError):
    """A defect of the ingester itself, neither the database's nor the payload's: reported as
    what it is, never retried; the flush it broke stays unacknowledged."""
