"""MQTT to TimescaleDB telemetry ingester."""

__version__ = "0.1.0"
