"""Thread safety of one patched model: per-thread hook state, and a count of the calls in flight.

A patched model's hooks are installed once, but a server may run forwards and ``generate`` calls on
the model from several threads at once. So everything a hook remembers between the hooks of one
call (the current rows of a prefill, what ``generate`` encoded, a vision tower's pass) lives in
attributes declared :class:`PerThread`: each thread sees its own value. Calls in different threads
therefore never see each other's rows, and each gives what it gives alone.

:class:`CallCount` counts the calls running on a model in all threads, so that ``unpatch`` (or a
new ``patch``) refuses, with a clear error, to pull the hooks from under a running call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

_LOCAL = "_tokenreduce_threads"  # the instance attribute holding the threading.local


def _local(obj: Any) -> threading.local:
    local = obj.__dict__.get(_LOCAL)
    if local is None:  # dict.setdefault is atomic: two threads arriving together share one
        local = obj.__dict__.setdefault(_LOCAL, threading.local())
    return local


class PerThread:
    """A data descriptor: the attribute has a separate value in each thread, ``default()`` until
    that thread sets it."""

    def __init__(self, default: Callable[[], Any] = lambda: None) -> None:
        self.default = default
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        local = _local(obj)
        try:
            return getattr(local, self.name)
        except AttributeError:
            value = self.default()
            setattr(local, self.name, value)
            return value

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(_local(obj), self.name, value)


class CallCount:
    """The forwards and ``generate`` calls running on one patched model, over all threads.

    ``enter``/``leave`` bracket a call (nested calls of one thread, such as ``generate``'s forwards,
    count once); ``closing`` removes the patch only while no call runs, and a call that starts
    during the removal waits for it and then runs unpatched (``enter`` returns False).
    """

    depth = PerThread(int)  # this thread's nesting

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.closed = False

    def enter(self) -> bool:
        """Start a call in this thread; False when the patch is removed (the call runs unpatched)."""
        if self.depth == 0:
            with self.lock:
                self.running += 1
        self.depth += 1
        return not self.closed

    def leave(self) -> None:
        if self.depth == 0:  # a leave whose enter never ran (a hook before it raised)
            return
        self.depth -= 1
        if self.depth == 0:
            with self.lock:
                self.running -= 1

    @contextmanager
    def call(self) -> Iterator[bool]:
        live = self.enter()
        try:
            yield live
        finally:
            self.leave()

    def check_idle(self) -> None:
        """RuntimeError if a call is running on the model (in any thread, this one included)."""
        running = self.running
        if running:
            raise RuntimeError(
                f"tokenreduce: cannot unpatch or re-patch this model while {running} forward/generate call(s) "
                "run on it (in this or other threads); wait until they return, e.g. patch once at start-up "
                "and keep the patch for the server's lifetime")

    @contextmanager
    def closing(self) -> Iterator[None]:
        """Hold off new calls while the patch is removed; RuntimeError (and nothing removed) if any runs."""
        with self.lock:
            self.check_idle()
            self.closed = True
            yield
