"""What an engine installed on one model (hooks, per-instance wrappers, undo callbacks), so that ``unpatch``
restores the model exactly."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial, wraps
from typing import Any

from torch import nn

_MISSING = object()


class Installation:
    """Hook handles, shadowed attributes and undo callbacks of one patch; :meth:`remove` undoes them all
    (undo callbacks last-in first-out, then the handles, then the wrappers, latest first)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.undo: list[Callable[[], None]] = []
        self.wrapped: list[tuple[nn.Module, str, Any]] = []  # (object, attribute, its previous instance value)

    def add_hook(self, handle: Any) -> None:
        self.handles.append(handle)

    def add_undo(self, undo: Callable[[], None]) -> None:
        self.undo.append(undo)

    def wrap(self, obj: nn.Module, name: str, wrapper: Callable[..., Any]) -> None:
        """Shadow ``obj.<name>`` on this instance by ``wrapper(original, *args, **kwargs)``. The signature is
        kept: ``generate()`` inspects it to pick encoder arguments."""
        original = getattr(obj, name)
        self.wrapped.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, wraps(original)(partial(wrapper, original)))

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for obj, name, previous in reversed(self.wrapped):  # wrappers may stack: undo the latest first
            if previous is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
        self.wrapped.clear()
