"""The allocator settings of `ingest run`: freed blocks stay with the process for reuse."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
from ingest import memory
applied = memory.keep_freed_memory() if sys.argv[1] == "tuned" else None

def resident_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4

before = resident_kib()
block = bytearray(16 * 1024 * 1024)  # zero-filled: every page is touched
held = resident_kib()
del block
print(applied, held - before, resident_kib() - before)
"""


def _probe(mode: str) -> tuple[str, int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_a_freed_16_mib_block_stays_resident_only_when_tuned() -> None:
    applied, held, after = _probe("tuned")
    assert applied == "True"
    assert held >= 16 * 1024 - 64
    assert after >= 16 * 1024 - 64  # kept at the top of the heap for the next flush
    applied, held, after = _probe("default")
    assert applied == "None"
    assert held >= 16 * 1024 - 64
    assert after < 1024  # glibc's default: an mmapped block goes back to the system
