"""``tome-vision`` on a LLaVA-OneVision (SigLIP) or LLaVA-NeXT-Video (CLIP) model: the hooks that run
:mod:`.tome` inside the vision tower and unmerge what the tower returns."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from ..engine.vision import VisionHandOff
from ..threads import PerThread
from .tome import TowerPass, tome_layer, unmerge

LLAVA_CLASSES = ("LlavaOnevisionForConditionalGeneration", "LlavaNextVideoForConditionalGeneration")


class TomeTower:
    """Hooks of one ``tome-vision`` method on one LLaVA model (installed by ``TomeVision.setup``)."""

    ctx = PerThread()  # TowerPass of the tower call running in this thread, else None

    def __init__(self, engine: Any, method: Any) -> None:
        name = type(engine.model).__name__
        if name not in LLAVA_CLASSES:
            raise ValueError(f"tome-vision merges tokens inside CLIP/SigLIP towers; {name} has none. Supported: "
                             f"{', '.join(LLAVA_CLASSES)}. For Qwen-VL video use static")
        self.method = method
        self.handoff = VisionHandOff(engine, method)
        self.tower = engine.adapter.base_model(engine.model).vision_tower
        vision = getattr(self.tower, "vision_model", self.tower)  # transformers 5.x: the tower itself
        self.layers = vision.encoder.layers
        self.cls = hasattr(vision.embeddings, "class_embedding")  # CLIP: token 0 is CLS, never merged
        cfg = self.tower.config
        self.patches = (cfg.image_size // cfg.patch_size) ** 2
        engine._wrap(self.tower, "forward", self._tower)
        for layer in self.layers:
            engine._wrap(layer, "forward", partial(self._layer, layer))
            engine.handles.append(layer.self_attn.k_proj.register_forward_hook(self._keys))

    def per_layer(self) -> int:
        """Tokens merged in each layer: ``r``, or spread evenly so ``retention`` of the patches remain."""
        if self.method.r is not None:
            return self.method.r
        return math.ceil(self.patches * (1 - self.method.retention) / len(self.layers))

    def _keys(self, module, args, output: torch.Tensor) -> None:
        if self.ctx is not None:
            self.ctx.keys = output

    def _layer(self, layer, original, hidden_states: torch.Tensor, attention_mask=None, **kwargs: Any):
        if self.ctx is None:
            return original(hidden_states, attention_mask, **kwargs)
        return tome_layer(layer, self.ctx, self.per_layer(), self.cls, hidden_states, attention_mask, **kwargs)

    def _tower(self, original, pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        frames = pixel_values.shape[0]
        n = self.patches + int(self.cls)
        device = pixel_values.device
        self.ctx = ctx = TowerPass(size=torch.ones(frames, n, device=device),
                                   source=torch.arange(n, device=device).expand(frames, n))
        try:
            out = original(pixel_values, *args, **kwargs)
        finally:
            self.ctx = None
        full = ctx.source  # the last layer's map
        for key in ("last_hidden_state",):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor) and value.shape[1] != n:
                setattr(out, key, unmerge(value, full))
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(self._unmerge_state(h, ctx, n) for h in out.hidden_states)
        tokens = ctx.tokens_per_layer
        encoded = sum(tokens) / len(tokens) if tokens else n
        self.handoff.publish({}, {"patches_in": frames * n, "patches_encoded": round(frames * encoded),
                                  "tokens_per_layer": tokens,
                                  "items": [{"kind": "frames", "frames": frames, "tokens_in": n,
                                             "tokens_out": tokens[-1] if tokens else n,
                                             "tokens_per_layer": tokens}]})
        return out

    @staticmethod
    def _unmerge_state(h: torch.Tensor, ctx: TowerPass, n: int) -> torch.Tensor:
        if h is None or h.shape[1] == n:  # not captured (transformers records only the layers read), or full
            return h
        source = ctx.maps.get(id(h))
        if source is None:  # a copy of the last layer's output (e.g. after a final norm)
            source = ctx.source
        return unmerge(h, source)
