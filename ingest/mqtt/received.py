"""What the source hands the pipeline: a message and the token that acknowledges it; and the
Maximum Packet Size it announces."""

from __future__ import annotations

from typing import Final

import msgspec

from ingest.mqtt import packets
from ingest.mqtt.ledger import AckLedger

__all__ = ["PUBLISH_OVERHEAD", "AckToken", "Received", "from_publish", "maximum_packet_size"]

# Room for what a PUBLISH carries besides its payload: the fixed header, the topic and the
# content type (MQTT strings, at most 64 KiB each), the packet id and small properties.
PUBLISH_OVERHEAD: Final = 2 * (2 + 65535) + 4096


def maximum_packet_size(max_payload_bytes: int) -> int:
    """The Maximum Packet Size to announce for payloads of up to `max_payload_bytes`.

    The broker discards larger messages for this client [MQTT-3.1.2-25]; a payload a little
    over the limit still arrives and becomes a dead letter.
    """
    return min(packets.MAX_REMAINING_LENGTH, max_payload_bytes + PUBLISH_OVERHEAD)


class AckToken(msgspec.Struct, frozen=True, gc=False):
    """Opaque handle to acknowledge one message; valid only on the connection that delivered it."""

    generation: int
    seq: int
    mid: int
    qos: int


class Received(msgspec.Struct, frozen=True, gc=False):
    """One MQTT message as the source hands it to the pipeline."""

    topic: str
    payload: bytes
    content_type: str | None
    """The MQTT v5 content-type property, if the publisher set one."""
    received_ns: int
    """``time.time_ns()`` when the message arrived from the socket."""
    published_us: int | None
    """The user property ``ts`` (publisher's clock, µs since the Unix epoch) if present and an
    integer. Only for end-to-end latency metrics; never trusted as a reading time."""
    token: AckToken


def from_publish(
    message: packets.Publish, stamp: int, *, generation: int, ledger: AckLedger
) -> Received:
    """`message`, received at `stamp` on connection `generation`, as the source hands it out;
    tracked in the connection's `ledger` if it is QoS 1."""
    seq = ledger.track(message.mid) if message.qos else -1
    return Received(
        message.topic,
        message.payload,
        message.content_type,
        stamp,
        message.published_us,
        AckToken(generation, seq, message.mid, message.qos),
    )
