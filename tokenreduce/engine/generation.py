"""Tracking ``generate`` calls on a patched model.

``generate`` (transformers >= 5.2x) encodes images and videos once, before any forward, and then drops
their grids and pixels from the forwards' arguments. The tracker keeps, per thread and for the whole call,
what the encoders were given and by how much ``generate`` expanded the batch (beams,
``num_return_sequences``), so each prefill can still build its layout.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..threads import CallCount, PerThread
from .install import Installation


class GenerateTracker:
    """What this thread's ``generate`` call encoded (``current``: ``{"visual": tensors, "expand": n}``, None
    outside ``generate``), and whether a forward of the base model runs in this thread (``in_forward``)."""

    current = PerThread()
    recording = PerThread(bool)
    in_forward = PerThread(bool)

    def __init__(self, calls: CallCount) -> None:
        self.calls = calls

    def install(self, model: nn.Module, base: nn.Module, installed: Installation) -> None:
        for name in ("get_image_features", "get_video_features"):
            self._record_calls(base, name, installed)
        installed.wrap(model, "generate", self._generate)
        installed.wrap(model, "_expand_inputs_for_generation", self._expand)

    def inputs(self, given: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """A prefill's inputs: its forward's own (``given``, not None) over what ``generate`` encoded, and the
        batch repeat of the recorded ones (they predate the expansion; the forward's own are expanded)."""
        recorded = self.current["visual"] if self.current else {}
        repeat = self.current["expand"] if set(recorded) - set(given) else 1
        return {**recorded, **given}, repeat

    def _generate(self, original, *args: Any, **kwargs: Any):
        with self.calls.call() as live:
            if not live:  # the patch was removed while this call started: it runs unpatched
                return original(*args, **kwargs)
            outer, self.current = self.current, {"visual": {}, "expand": 1}
            try:
                return original(*args, **kwargs)
            finally:
                self.current = outer

    def _expand(self, original, *args: Any, **kwargs: Any):
        if self.current is not None:
            self.current["expand"] = kwargs.get("expand_size", args[0] if args else 1)
        return original(*args, **kwargs)

    def _record_calls(self, base: nn.Module, name: str, installed: Installation) -> None:
        """Remember the tensors ``generate`` passes to ``base.<name>`` before its forwards; calls made inside
        a forward or outside ``generate`` are not recorded."""
        if getattr(base, name, None) is None:
            return
        signature = inspect.signature(getattr(base, name))

        def recorder(fn, *args: Any, **kwargs: Any):
            # an encoder calling another (Qwen3-VL: videos through the image path) records once
            if self.recording or self.in_forward or self.current is None:
                return fn(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs)
            seen = {k: v for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
            self.current["visual"].update(seen)
            self.recording = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.recording = False

        installed.wrap(base, name, recorder)
