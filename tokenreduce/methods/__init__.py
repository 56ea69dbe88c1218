"""Token-reduction methods, one file each. Every ``Method`` subclass with a ``name`` registers itself;
importing this package imports every module here and in ``tokenreduce.kv.methods`` (the cache-stage
methods), so adding a method means adding a file."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields

from ..defaults import VISUAL
from .base import REGISTRY, Method, Selection, Step, VisualMethod

_PACKAGES = (__name__, "tokenreduce.kv.methods")


def _discover() -> None:
    for package in _PACKAGES:
        try:
            pkg = importlib.import_module(package)
        except ModuleNotFoundError as err:
            if not err.name or not package.startswith(err.name):  # a missing dependency, not package
                raise
            continue
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if info.name != "base":
                importlib.import_module(f"{package}.{info.name}")


_discover()
from .fastv import FastV  # noqa: E402  (registered above; re-exported for convenience)
from .framefusion import FrameFusion  # noqa: E402


def methods() -> dict[str, str]:
    """Registered method names with a one-line description each; the default of ``tokenreduce.patch(model)``
    for video/image LLMs says so, with the measurement it rests on (``tokenreduce.defaults``)."""
    out = {name: cls.description for name, cls in REGISTRY.items()}
    if VISUAL.method in out:
        out[VISUAL.method] += (f" [default of tokenreduce.patch(model) for video/image LLMs, "
                               f"{', '.join(f'{k}={v}' for k, v in VISUAL.options.items())}: {VISUAL.why}]")
    return out


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
        advice = "".join(f". {cls.retired[k]}" for k in unknown if k in cls.retired)
        raise TypeError(f"{cls.name} has no option(s) {unknown}; its options are {allowed}{advice}")
    return cls(**options)


__all__ = ["REGISTRY", "FastV", "FrameFusion", "Method", "Selection", "Step", "VisualMethod", "make_method", "methods"]
