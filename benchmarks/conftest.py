"""Micro-benchmarks run with the allocator settings of `ingest run` (see ingest/malloc.py)."""

from __future__ import annotations

from ingest import malloc


def pytest_configure() -> None:
    malloc.keep_freed_memory()
