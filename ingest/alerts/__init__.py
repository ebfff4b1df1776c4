"""Alerts: asset metadata, alert lifecycles from committed anomaly events, and their delivery."""
