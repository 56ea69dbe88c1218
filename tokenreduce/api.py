"""patch / unpatch / stats / calibrate: validate options, pick the adapter, install the engines, undo them.

Methods name the engine that runs them (``Method.engine``): ``"hf"`` methods act on visual tokens
(vision tower, embeddings, LLM layers; :class:`tokenreduce.engine.hf.HFEngine`), ``"kv"`` methods on
the KV cache (``tokenreduce.kv.engine.KVEngine``). ``patch(model, [m1, m2])`` composes methods; each
engine gets the methods of its kind, in the order given.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from types import SimpleNamespace
from typing import Any

from torch import nn

from .calibration import AttentionObserver
from .defaults import VISUAL, Default
from .hooks import ENGINE_ATTR, KV_ATTR
from .methods import REGISTRY, Method, make_method
from .profiles import load_profile, save_profile

_PATCHING = threading.RLock()  # patch/unpatch of any model, one at a time (installation is not atomic)
_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__")  # what copy.deepcopy and pickle (torch.save) look up on the object


def _refuse_copy(*_: Any) -> None:
    """Installed on a patched model as its ``__deepcopy__`` and ``__reduce_ex__``: a copy would carry hooks
    that still act on (and count calls of) the original model, so copying or pickling is refused."""
    raise TypeError("tokenreduce: a patched model cannot be deep-copied or pickled (its hooks and per-call state "
                    "belong to this model object; a copy would run them on the original). Copy or pickle the "
                    "model unpatched: tokenreduce.unpatch(model), copy it, then tokenreduce.patch each copy")


class Installed:
    """The engines patched onto one model, in installation order."""

    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = engines

    def remove(self) -> None:
        """Remove every engine; an engine that refuses while calls run refuses before any is removed."""
        for engine in self.engines.values():
            check = getattr(engine, "check_idle", None)
            if check is not None:
                check()
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
    every method given by name that has it. Patching a patched model replaces the previous patch
    (RuntimeError while a call runs on it). A patched model may run forwards and ``generate`` in
    several threads at once: each call keeps its own state (see :mod:`tokenreduce.threads`).
    Raises TypeError for unsupported models or unknown options and ValueError for values out of
    range or methods that conflict.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a transformers model, got {type(model).__name__}")
    if method is None:
        pick = recommend(model)
        method, options = pick.method, {**pick.options, **options}
        logging.getLogger("tokenreduce").info("tokenreduce.patch: no method given; using %s with %s: %s",
                                              pick.method, options, pick.why)
    chosen = _methods(method, options)
    kinds: dict[str, list[Method]] = {}
    for m in chosen:
        kinds.setdefault(m.engine, []).append(m)
    if "hf" in kinds and "kv" in kinds:  # both would own the attention implementation
        raise ValueError(f"cache methods {[m.name for m in kinds['kv']]} cannot be composed with visual-token methods "
                         f"{[m.name for m in kinds['hf']]} yet; patch methods of one kind")
    with _PATCHING:
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
        setattr(model, ENGINE_ATTR, Installed(engines))
        for name in _COPY_HOOKS:  # found on the instance before the class's (and before any hook's state)
            object.__setattr__(model, name, _refuse_copy)
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
    installed = getattr(model, ENGINE_ATTR, None)
    if installed is None:
        raise ValueError("this model is not patched by tokenreduce; call tokenreduce.patch first")
    return installed


def unpatch(model: nn.Module) -> nn.Module:
    """Remove tokenreduce from ``model``: every hook, the attention wrapper, the engines. RuntimeError
    while a forward or ``generate`` call runs on the model (in any thread)."""
    with _PATCHING:
        _installed(model).remove()
        delattr(model, ENGINE_ATTR)
        for name in _COPY_HOOKS:
            model.__dict__.pop(name, None)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, ENGINE_ATTR, None) is not None


def stats(model: nn.Module):
    """What the last prefill of a patched model did: the visual engine's :class:`Stats`, or the KV
    engine's :class:`tokenreduce.kv.stats.KVStats` when cache methods are patched (the two kinds are
    not composed, see :func:`patch`)."""
    (engine,) = _installed(model).engines.values()
    return engine.stats()


def calibrate(model: nn.Module, method: str, samples: Any, **options: Any) -> dict[str, Any]:
    """Run ``method``'s calibration on ``samples`` and return its profile (a JSON-serialisable dict),
    to pass as ``patch(model, method, profile=profile)`` or save with :func:`save_profile`."""
    cls = REGISTRY.get(method.lower()) if isinstance(method, str) else None
    if cls is None:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(REGISTRY)}")
    if is_patched(model):
        raise ValueError("calibrate needs the unpatched model; call tokenreduce.unpatch first")
    return cls.calibrate(model, samples, run=Calibration(model), **options)


class Calibration:
    """:class:`tokenreduce.calibration.CalibrationRun` over an unpatched ``model``: what :func:`calibrate`
    lends a method's ``calibrate`` (so methods need not import this module)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    def num_layers(self) -> int:
        from .models import adapter_for  # model adapters load with the engines (see _make_engine)

        return len(list(adapter_for(self.model).layers(self.model)))

    @contextmanager
    def patched(self, method: Method) -> Iterator[Callable[[], Any]]:
        patch(self.model, method)
        try:
            yield lambda: stats(self.model)
        finally:
            unpatch(self.model)

    @contextmanager
    def observe_attention(self, observer: AttentionObserver) -> Iterator[None]:
        from .kv.attention import kv_attention  # transformers' attention code loads only when calibrating
        from .kv.model import text_parts

        parts = text_parts(self.model)
        original = parts.config._attn_implementation
        parts.config._attn_implementation = kv_attention(original)
        hook = SimpleNamespace(attend=observer)  # kv_attention hands every call to `attend` of what it finds
        for layer in parts.layers:
            setattr(layer.self_attn, KV_ATTR, hook)
        try:
            yield
        finally:
            for layer in parts.layers:
                delattr(layer.self_attn, KV_ATTR)
            parts.config._attn_implementation = original


__all__ = ["calibrate", "is_patched", "load_profile", "patch", "save_profile", "stats", "unpatch"]


def recommend(model: nn.Module) -> Default:
    """The default method for ``model``'s kind; ValueError listing the choices when there is none."""
    from .models import adapter_for  # model adapters load with the engines (see _make_engine)

    try:
        adapter_for(model)
    except TypeError:
        kv = sorted(n for n, c in REGISTRY.items() if c.engine == "kv")
        visual = sorted(n for n, c in REGISTRY.items() if c.engine != "kv")
        kind = "a text-only LLM" if hasattr(model, "get_input_embeddings") else f"a {type(model).__name__}"
        raise ValueError(
            f"tokenreduce.patch(model) picks a default only for the supported video/image LLM classes; this is "
            f"{kind}, where no KV-cache method is safe for every task. Name one: "
            f"tokenreduce.patch(model, NAME, ...) with NAME among the KV-cache methods {', '.join(kv)} "
            f"(visual methods {', '.join(visual)} need a supported video/image LLM)") from None
    return VISUAL
