"""Guards for one model shared by several threads: a lock per model for patch/unpatch, and the forwards in flight.

``tokenreduce.patch`` and ``unpatch`` change the model for every caller (hooks, attention function, config), so
they hold :func:`model_lock` while they work; an engine records the threads running a forward of its model
(:class:`Running`) and refuses to be removed while another thread is inside one, instead of pulling hooks and
state from under it.
"""

from __future__ import annotations

import threading
from weakref import WeakKeyDictionary

from torch import nn

_LOCKS: WeakKeyDictionary[nn.Module, threading.RLock] = WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock that serialises patching ``model`` (one per model object, created on first use; not stored on
    the model, so copying or pickling the model is unaffected)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class Running:
    """The threads inside a forward of one model (a thread runs one forward at a time, so a set of thread
    idents; a thread that died inside a forward is forgotten)."""

    def __init__(self) -> None:
        self._threads: set[int] = set()
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            self._threads.add(threading.get_ident())

    def leave(self) -> None:
        with self._lock:
            self._threads.discard(threading.get_ident())

    def others(self) -> int:
        """Live threads other than the caller that are inside a forward."""
        live = {t.ident for t in threading.enumerate()}
        with self._lock:
            self._threads &= live
            return len(self._threads - {threading.get_ident()})
