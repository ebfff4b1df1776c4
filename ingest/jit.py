"""The one way this package compiles a numba kernel."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

from numba import njit

__all__ = ["kernel", "small_kernel"]

_F = TypeVar("_F", bound=Callable[..., Any])
_log = logging.getLogger(__name__)
_uncached: list[str] = []


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


def _compile(fn: _F, *, nogil: bool) -> _F:
    try:
        return cast(_F, njit(cache=True, nogil=nogil)(fn))
    except RuntimeError as exc:  # numba: "cannot cache function ...: no locator available"
        if not _uncached:
            _log.warning("numba cache unavailable, kernels compile at every start: %s", exc)
        _uncached.append(fn.__name__)
        return cast(_F, njit(nogil=nogil)(fn))
