"""The one way this package compiles a numba kernel."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from numba import njit

__all__ = ["forget_stale_kernels", "kernel", "small_kernel"]

_F = TypeVar("_F", bound=Callable[..., Any])
_log = logging.getLogger(__name__)
_uncached: list[str] = []

_STAMP = "kernel-sources.digest"
_CACHED = (".nbi", ".nbc")


def forget_stale_kernels(root: Path) -> bool:
    """Delete the numba cache files under `root` (a package's tree) when any of its modules that
    compile kernels changed since the last call; returns whether they were deleted.

    numba checks a cached kernel against its own source file only. A kernel that inlines one
    from another module would keep running the old code after that module changed (an edit, a
    `git checkout`): the files are dropped whenever the digest of every kernel module's path,
    size and modification time differs from the one recorded beside them.
    """
    digest = hashlib.blake2b(digest_size=16)
    for path in sorted(root.rglob("*.py")):
        text = path.read_bytes()
        if b"numba" not in text and b"ingest.jit" not in text:
            continue
        st = path.stat()
        digest.update(
            f"{path.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}\n".encode()
        )
    stamp = root / "__pycache__" / _STAMP
    new = digest.hexdigest()
    try:
        if stamp.read_text() == new:
            return False
    except OSError:
        pass
    try:
        for cached in root.rglob("__pycache__/*"):
            if cached.suffix in _CACHED:
                cached.unlink(missing_ok=True)
        stamp.parent.mkdir(exist_ok=True)
        part = stamp.with_name(f"{_STAMP}.{os.getpid()}")
        part.write_text(new)
        part.replace(stamp)
    except OSError:  # a read-only tree: an upgrade rewrites every file, which numba notices
        return False
    return True


def kernel(fn: _F) -> _F:
    """Compile `fn` with numba, GIL released while it runs, cached on disk where possible.

    The cache lives next to the module, else (read-only install) in the user's cache directory,
    or in NUMBA_CACHE_DIR if set. With no writable place at all, kernels compile at every start,
    in `ingest.warmup.warm_up`.
    """
    return _compile(fn, nogil=True)


def small_kernel(fn: _F) -> _F:
    """`kernel` for calls of a few microseconds, made per message: the GIL is kept. Giving it
    up and taking it back costs more than such a call, and while another thread runs Python,
    taking it back waits up to the interpreter's switch interval (5 ms)."""
    return _compile(fn, nogil=False)


forget_stale_kernels(Path(__file__).parent)


def _compile(fn: _F, *, nogil: bool) -> _F:
    try:
        return cast(_F, njit(cache=True, nogil=nogil)(fn))
    except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
        if not _uncached:
            _log.warning("numba cache unavailable, kernels compile at every start: %s", exc)
        _uncached.append(fn.__name__)
        return cast(_F, njit(nogil=nogil)(fn))
