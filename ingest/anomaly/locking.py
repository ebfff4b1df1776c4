"""A readers-writer lock for state that numba kernels read with the GIL released: many readers at
once, or one writer alone; and method decorators that take it."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Concatenate, ParamSpec, Protocol, TypeVar

__all__ = ["Guarded", "SharedLock", "reads", "writes"]

_P = ParamSpec("_P")
_R = TypeVar("_R")
_G = TypeVar("_G", bound="Guarded")


class Guarded(Protocol):
    """An object whose methods take its `guard` through `reads` and `writes`."""

    guard: SharedLock


class SharedLock:
    """Many holders at once in `shared` mode, or one alone in `exclusive` mode."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def reads(
    method: Callable[Concatenate[_G, _P], _R],
) -> Callable[Concatenate[_G, _P], _R]:
    """The method only reads the committed state: it may run beside other readers."""

    @functools.wraps(method)
    def locked(self: _G, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.guard.shared():
            return method(self, *args, **kwargs)

    return locked


def writes(
    method: Callable[Concatenate[_G, _P], _R],
) -> Callable[Concatenate[_G, _P], _R]:
    """The method changes the state: it runs alone."""

    @functools.wraps(method)
    def locked(self: _G, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.guard.exclusive():
            return method(self, *args, **kwargs)

    return locked
