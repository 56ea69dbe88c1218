"""Token-reduction methods, one file each; the registry maps names to classes."""

from __future__ import annotations

from dataclasses import fields

from .base import Method, Selection, Step
from .fastv import FastV
from .framefusion import FrameFusion

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (FrameFusion, FastV)}


def methods() -> dict[str, str]:
    """Registered method names with a one-line description each."""
    return {name: cls.description for name, cls in REGISTRY.items()}


def make_method(method: str | Method, **options) -> Method:
    """A method object from a registered name and options, or the given object itself."""
    if isinstance(method, Method):
        if options:
            raise TypeError(f"options {sorted(options)} were given with a method object; set them on the object")
        return method
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a tokenreduce method object, got {type(method).__name__}")
    cls = REGISTRY.get(method.lower())
    if cls is None:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(REGISTRY)}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"{cls.name} has no option(s) {unknown}; its options are {allowed}")
    return cls(**options)


__all__ = ["REGISTRY", "FastV", "FrameFusion", "Method", "Selection", "Step", "make_method", "methods"]
