"""Benchmarks: pytest-benchmark micro-benchmarks and the end-to-end command (benchmarks.e2e)."""
