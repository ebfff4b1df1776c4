"""MQTT v5 for the hot path, our own: packets, a connection on asyncio, the ack ledger, the source.

The pipeline sees ``MqttSource``: messages in, acknowledge tokens out. ``Settings`` is the
``[mqtt]`` section of the configuration.
"""

from ingest.mqtt.settings import Settings
from ingest.mqtt.source import AckToken, MqttSource, Received

__all__ = ["AckToken", "MqttSource", "Received", "Settings"]
