"""The kernel cache is dropped when a module that compiles kernels changes."""

from __future__ import annotations

import os
from pathlib import Path

from ingest.jit import forget_stale_kernels


def _tree(root: Path) -> None:
    (root / "sub" / "__pycache__").mkdir(parents=True)
    (root / "__pycache__").mkdir()
    (root / "sub" / "inlined.py").write_text("from numba import njit\n")
    (root / "caller.py").write_text("from ingest.jit import kernel\n")
    (root / "plain.py").write_text("X = 1\n")


def _cached(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.nb*"))


def _fill(root: Path) -> None:
    for name in ("__pycache__/caller.f-1.py311.nbi", "__pycache__/caller.f-1.py311.1.nbc"):
        (root / name).write_bytes(b"x")
    (root / "sub/__pycache__/inlined.g-2.py311.nbi").write_bytes(b"x")
    (root / "__pycache__/caller.cpython-311.pyc").write_bytes(b"x")


def test_cache_files_go_when_a_kernel_module_changes_and_stay_otherwise(tmp_path: Path) -> None:
    _tree(tmp_path)
    _fill(tmp_path)
    assert forget_stale_kernels(tmp_path) is True  # nothing recorded yet
    assert _cached(tmp_path) == []
    assert (tmp_path / "__pycache__/caller.cpython-311.pyc").exists()

    _fill(tmp_path)
    assert forget_stale_kernels(tmp_path) is False
    assert _cached(tmp_path) == [
        "__pycache__/caller.f-1.py311.1.nbc",
        "__pycache__/caller.f-1.py311.nbi",
        "sub/__pycache__/inlined.g-2.py311.nbi",
    ]

    (tmp_path / "plain.py").write_text("X = 2\n")  # no kernel in it
    assert forget_stale_kernels(tmp_path) is False
    assert len(_cached(tmp_path)) == 3

    inlined = tmp_path / "sub" / "inlined.py"
    st = inlined.stat()
    os.utime(inlined, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # `git checkout`
    assert forget_stale_kernels(tmp_path) is True
    assert _cached(tmp_path) == []
    assert forget_stale_kernels(tmp_path) is False
