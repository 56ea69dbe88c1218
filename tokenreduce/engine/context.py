"""``HFMethodContext``: the :class:`tokenreduce.context.MethodContext` one visual method's ``setup`` gets from
:class:`~tokenreduce.engine.hf.HFEngine`. It forwards each request to the engine's installation (undoable
wrappers and hooks), prefill state, vision hand-over and frozen layers, so a method never holds the engine."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..context import Prefill
from ..layout import TokenLayout
from ..methods.base import VisualMethod
from ..models import supported_classes
from .vision import VisionHandOff


class PrefillView:
    """One prefill as :class:`tokenreduce.context.Prefill`: its layout and the per-method memos."""

    def __init__(self, layout: TokenLayout, memos: dict[str, dict[str, Any]]) -> None:
        self.layout, self._memos = layout, memos

    def memo(self, method: str) -> dict[str, Any]:
        return self._memos.setdefault(method, {})


class HFMethodContext:
    """What ``method.setup(ctx)`` may do on ``engine``'s model (see :class:`tokenreduce.context.MethodContext`)."""

    def __init__(self, engine: Any, method: VisualMethod) -> None:  # engine: the HFEngine building it
        self._engine, self._method = engine, method
        self.architecture = type(engine.model).__name__
        self.num_layers = engine.num_layers
        self.features = engine.adapter.features
        self.rope = "mrope" if engine.mrope else "1d"
        # a vision-stage method hands what the tower did to the LLM stage and to Stats.stages["vision"]
        self._handoff = VisionHandOff(engine, method) if "vision" in method.stages else None

    def supported(self, feature: str) -> list[str]:
        """The model classes whose family offers ``feature`` (for error messages)."""
        return supported_classes(feature)

    def tower(self) -> Any:
        return self._engine.adapter.tower(self._engine.model)

    def wrap(self, obj: nn.Module, name: str, wrapper: Callable[..., Any]) -> None:
        self._engine.installed.wrap(obj, name, wrapper)

    def add_hook(self, handle: Any) -> None:
        self._engine.installed.add_hook(handle)

    def on_prefill(self, callback: Callable[[Prefill], None]) -> None:
        engine = self._engine

        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:  # after the engine's own
            state = engine.state
            if state is not None:
                callback(PrefillView(state.layout, state.memo))

        base = engine.adapter.base_model(engine.model)
        engine.installed.add_hook(base.register_forward_pre_hook(hook, with_kwargs=True))

    def publish_vision(self, entries: dict[str, Any], notes: dict[str, Any]) -> None:
        if self._handoff is None:
            raise RuntimeError(f"{self._method.name} publishes a vision-stage report but has no 'vision' stage")
        self._handoff.publish(entries, notes)

    def freeze(self, layers: set[int]) -> None:
        self._engine.installed.add_undo(self._engine.freeze(layers))
