"""The property tests' Hypothesis settings, one place for what they all share."""

from __future__ import annotations

from hypothesis import HealthCheck, settings


def property_settings(max_examples: int, *also: HealthCheck) -> settings:
    """`max_examples` examples, no deadline (no timed assertions), no example database (every
    run the same), slow data generation allowed, and the health checks in `also` off too."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, *also],
    )
