"""Micro-benchmarks run with the allocator settings of `ingest run` (see ingest/memory.py)."""

from __future__ import annotations

from ingest import memory


def pytest_configure() -> None:
    memory.keep_freed_memory()
