"""What a broker's refusals mean for the operator: the ones a retry cannot fix become a
`ConfigError` naming the setting to blame; the others end the connection, to be retried."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from ingest.errors import ConfigError
from ingest.mqtt.control import ConnectionLostError

__all__ = ["check_suback", "connack_error"]

# CONNACK refusals that a retry cannot fix, and the setting to blame.
_CONNACK_FATAL: Final = {
    0x84: ("mqtt.url", "the broker does not support MQTT v5"),
    0x85: ("mqtt.client_id", "the broker rejected the client identifier"),
    0x86: ("mqtt.url", "bad user name or password"),
    0x87: ("mqtt.url", "not authorized to connect"),
    0x8C: ("mqtt.url", "bad authentication method"),
}
# SUBACK refusals that a retry cannot fix.
_SUBACK_FATAL: Final = {
    0x87: ("mqtt.topic_prefix", "not authorized to subscribe"),
    0x8F: ("mqtt.topic_prefix", "the broker rejected the topic filter"),
    0x9E: ("mqtt.share_group", "the broker does not support shared subscriptions"),
    0xA2: ("mqtt.topic_prefix", "the broker does not support wildcard subscriptions"),
}


def connack_error(code: int | None, where: str) -> ConfigError | None:
    """The error for a CONNACK refusal `code` from the broker at `where`, if retrying is futile."""
    if code not in _CONNACK_FATAL:
        return None
    key, reason = _CONNACK_FATAL[code]
    return ConfigError(f"{key}: {where} refused the connection: {reason}")


def check_suback(
    pairs: Sequence[tuple[str, int]], codes: Sequence[int], reason: str | None
) -> None:
    """Raise unless the SUBACK granted QoS 1 or more to every (filter, options) of `pairs`."""
    if len(codes) != len(pairs):
        raise ConnectionLostError(f"the SUBACK holds {len(codes)} codes for {len(pairs)} filters")
    for (topic_filter, _), code in zip(pairs, codes, strict=True):
        if code in _SUBACK_FATAL:
            key, text = _SUBACK_FATAL[code]
            raise ConfigError(f"{key}: subscribing to {topic_filter!r} failed: {text}")
        if code == 0:
            raise ConfigError(
                f"mqtt.url: the broker granted only QoS 0 for {topic_filter!r}; "
                "acknowledgement after commit needs QoS 1"
            )
        if code >= 0x80:
            raise ConnectionLostError(
                f"subscribing to {topic_filter!r} failed: reason code 0x{code:02x}"
                + (f" ({reason})" if reason else ""),
                code=code,
            )
