"""The vision towers of the supported families, as :class:`tokenreduce.context.Tower`: what a method may hook
(the tower module, its encoder owner, its blocks) and family facts (Qwen-VL's spatial merge, CLIP's CLS
token, the patch count), built by the family's adapter (``ModelAdapter.tower``), so no method names a model
class or probes a model's attributes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .qwen_partial import run_partial
from .tower_probe import LlavaTowerProbe, QwenTowerProbe


class QwenTower:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL (a :class:`tokenreduce.context.MergeUnitTower`): patches grouped in
    ``merge_size**2`` spatial merge units of 2-frame temporal patches; the tower can run on a partial grid of
    kept units (:mod:`.qwen_partial`)."""

    def __init__(self, model: nn.Module, base: nn.Module) -> None:
        self.model, self.encoders, self.module = model, base, base.visual
        self.merge_size: int = self.module.spatial_merge_size

    def probe(self, layer: int | None) -> QwenTowerProbe:
        return QwenTowerProbe(self.model, self.encoders, layer)

    def run_partial(self, forward: Callable[..., Any], pixels: torch.Tensor, grid_thw: torch.Tensor,
                    keep: torch.Tensor, rep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``forward`` (the tower's own) on the kept units only; every unit gets its representative's output."""
        return run_partial(forward, self.module, pixels, grid_thw, keep, rep, **kwargs)


class ClipSiglipTower:
    """LLaVA-NeXT-Video's CLIP or LLaVA-OneVision's SigLIP tower (a :class:`tokenreduce.context.EncoderTower`):
    ``blocks`` of pre-norm encoder layers over
    ``patches`` patch tokens per image/frame, after a CLS token when ``has_cls``."""

    def __init__(self, model: nn.Module, base: nn.Module, bilinear_pooling: bool) -> None:
        self.model, self.encoders, self.module = model, base, base.vision_tower
        self.bilinear_pooling = bilinear_pooling
        vision = getattr(self.module, "vision_model", self.module)  # transformers 5.x: the tower itself
        self.blocks: nn.ModuleList = vision.encoder.layers
        self.has_cls: bool = hasattr(vision.embeddings, "class_embedding")  # CLIP: token 0 is CLS
        cfg = self.module.config
        self.patches: int = (cfg.image_size // cfg.patch_size) ** 2

    @staticmethod
    def key_proj(block: nn.Module) -> nn.Module:
        """The key projection of one encoder layer (ToMe matches tokens on its output)."""
        return block.self_attn.k_proj

    def probe(self, layer: int | None) -> LlavaTowerProbe:
        return LlavaTowerProbe(self.model, self.encoders, layer, self.bilinear_pooling)


__all__ = ["ClipSiglipTower", "QwenTower"]
