"""patch / unpatch / stats / calibrate: validate options, pick the adapter, install the engines, undo them.

Methods name the engine that runs them (``Method.engine``): ``"hf"`` methods act on visual tokens
(vision tower, embeddings, LLM layers; :class:`tokenreduce.engine.hf.HFEngine`), ``"kv"`` methods on
the KV cache (``tokenreduce.kv.engine.KVEngine``). ``patch(model, [m1, m2])`` composes methods; each
engine gets the methods of its kind, in the order given.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

from torch import nn

from .methods import REGISTRY, Method, make_method
from .profiles import load_profile, save_profile

_ATTR = "_tokenreduce_engine"  # the same name the engine puts on attention modules (engine.attention)


class Installed:
    """The engines patched onto one model, in installation order."""

    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = engines

    def remove(self) -> None:
        for engine in reversed(list(self.engines.values())):
            engine.remove()


def _methods(method: str | Method | list | tuple, options: dict[str, Any]) -> list[Method]:
    if not isinstance(method, (list, tuple)):
        return [make_method(method, **options)]
    if not method:
        raise ValueError("patch(model, []) needs at least one method")
    names = [m if isinstance(m, str) else getattr(m, "name", None) for m in method]
    out = []
    for m in method:  # an option goes to every named method that has it
        cls = REGISTRY.get(m.lower()) if isinstance(m, str) else None
        mine = {k: v for k, v in options.items() if cls and k in {f.name for f in fields(cls)}}
        out.append(make_method(m, **mine))
    used = {k for m in method if isinstance(m, str) and m.lower() in REGISTRY
            for k in (f.name for f in fields(REGISTRY[m.lower()]))}
    unknown = sorted(set(options) - used)
    if unknown:
        raise TypeError(f"no method among {names} given by name has option(s) {unknown}; "
                        "set options on method objects to give different methods different values")
    seen = [m.name for m in out]
    if len(set(seen)) != len(seen):
        raise ValueError(f"a method appears twice in {seen}; give it once")
    return out


def patch(model: nn.Module, method: str | Method | list[str | Method] | None = None, **options: Any) -> nn.Module:
    """Install ``method`` on ``model`` in place and return the model.

    Without ``method``, the recommended one for the model's kind (``tokenreduce.defaults``, logged on
    the ``tokenreduce`` logger at INFO); ``options`` then override its settings.

    ``method`` is a registered name (see :func:`methods`) with its options as keyword arguments, a
    method object such as ``FrameFusion(retention=0.3)``, or a list of them to compose methods that
    act at different stages (e.g. ``["aim", "shortv"]``); with a list, each keyword option goes to
    every method given by name that has it. Patching a patched model replaces the previous patch.
    Raises TypeError for unsupported models or unknown options and ValueError for values out of
    range or methods that conflict.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a transformers model, got {type(model).__name__}")
    if method is None:
        from .defaults import recommend

        pick = recommend(model)
        method, options = pick.method, {**pick.options, **options}
        logging.getLogger("tokenreduce").info("tokenreduce.patch: no method given; using %s with %s: %s",
                                              pick.method, options, pick.why)
    chosen = _methods(method, options)
    kinds: dict[str, list[Method]] = {}
    for m in chosen:
        kinds.setdefault(m.engine, []).append(m)
    if is_patched(model):
        unpatch(model)
    engines: dict[str, Any] = {}
    try:
        for kind, group in kinds.items():
            engines[kind] = _make_engine(kind, model, group)
            engines[kind].install()
    except BaseException:
        Installed(engines).remove()
        raise
    setattr(model, _ATTR, Installed(engines))
    return model


def _make_engine(kind: str, model: nn.Module, group: list[Method]):
    """The engine of ``kind`` for ``group``; engines load lazily (they import transformers' modeling code)."""
    if kind == "hf":
        from .engine.hf import HFEngine
        from .models import adapter_for

        return HFEngine(model, adapter_for(model), group)
    if kind == "kv":
        from .kv.engine import KVEngine

        return KVEngine(model, group)
    raise ValueError(f"unknown engine {kind!r} for methods {[m.name for m in group]}")


def _installed(model: nn.Module) -> Installed:
    installed = getattr(model, _ATTR, None)
    if installed is None:
        raise ValueError("this model is not patched by tokenreduce; call tokenreduce.patch first")
    return installed


def unpatch(model: nn.Module) -> nn.Module:
    """Remove tokenreduce from ``model``: every hook, the attention wrapper, the engines."""
    _installed(model).remove()
    delattr(model, _ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def stats(model: nn.Module):
    """What the last prefill of a patched model did: the visual engine's :class:`Stats`, or the KV
    engine's statistics when only cache methods are patched."""
    engines = _installed(model).engines
    engine = engines.get("hf") or next(iter(engines.values()))
    out = engine.stats()
    if "hf" in engines and "kv" in engines:
        out.kv = engines["kv"].stats()
    return out


def calibrate(model: nn.Module, method: str, samples: Any, **options: Any) -> dict[str, Any]:
    """Run ``method``'s calibration on ``samples`` and return its profile (a JSON-serialisable dict),
    to pass as ``patch(model, method, profile=profile)`` or save with :func:`save_profile`."""
    cls = REGISTRY.get(method.lower()) if isinstance(method, str) else None
    if cls is None:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(REGISTRY)}")
    if is_patched(model):
        raise ValueError("calibrate needs the unpatched model; call tokenreduce.unpatch first")
    return cls.calibrate(model, samples, **options)


__all__ = ["calibrate", "is_patched", "load_profile", "patch", "save_profile", "stats", "unpatch"]
