"""patch / unpatch / stats: validate options, pick the adapter, install the engine, undo it."""

from __future__ import annotations

from torch import nn

from .engine.stats import Stats
from .methods import Method, make_method
from .models import adapter_for

_ATTR = "_tokenreduce_engine"  # the same name the engine puts on attention modules (engine.attention)


def patch(model: nn.Module, method: str | Method, **options) -> nn.Module:
    """Install ``method`` on ``model`` in place and return the model.

    ``method`` is a registered name (see :func:`methods`) with its options as keyword arguments,
    or a method object such as ``FrameFusion(retention=0.3)``. Patching a patched model replaces
    the previous patch. Raises TypeError for unsupported models or unknown options and
    ValueError for values out of range.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a transformers model, got {type(model).__name__}")
    adapter = adapter_for(model)
    method = make_method(method, **options)
    if is_patched(model):
        unpatch(model)
    from .engine.hf import HFEngine  # transformers' modeling code loads only when needed

    engine = HFEngine(model, adapter, method)
    engine.install()
    setattr(model, _ATTR, engine)
    return model


def _engine(model: nn.Module):
    engine = getattr(model, _ATTR, None)
    if engine is None:
        raise ValueError("this model is not patched by tokenreduce; call tokenreduce.patch first")
    return engine


def unpatch(model: nn.Module) -> nn.Module:
    """Remove tokenreduce from ``model``: every hook, the attention wrapper, the engine."""
    _engine(model).remove()
    delattr(model, _ATTR)
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _ATTR, None) is not None


def stats(model: nn.Module) -> Stats:
    """What the last prefill of a patched model did (see :class:`Stats`)."""
    engine = _engine(model)
    if engine.record is None:
        raise RuntimeError("no forward pass has run since tokenreduce.patch")
    return engine.record.stats()
