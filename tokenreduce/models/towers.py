"""The vision towers of the supported families, as :class:`tokenreduce.context.Tower`: what a method may hook
(the tower module, its encoder owner, its blocks) and family facts (Qwen-VL's spatial merge, a CLS token,
the patch count, the structure of an encoder layer), built by the family's adapter (``ModelAdapter.tower``),
so no method names a model class or probes a model's attributes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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


class ClipSiglipBlock:
    """One CLIP / SigLIP encoder layer (``CLIPEncoderLayer``, ``SiglipEncoderLayer``):
    ``x + self_attn(layer_norm1(x))``, then ``x + mlp(layer_norm2(x))``. The attention runs through the
    module itself (the model's backend), the proportional-attention bias passed as its additive mask."""

    def __init__(self, layer: nn.Module) -> None:
        self.module, self.attention = layer, layer.self_attn
        attn = layer.self_attn
        self.q_proj, self.k_proj = attn.q_proj, attn.k_proj
        self.heads: int = attn.num_heads
        self.head_dim: int = attn.head_dim
        self.scaling: float = attn.scale

    @staticmethod
    def layers_of(tower: nn.Module) -> nn.ModuleList:
        return getattr(tower, "vision_model", tower).encoder.layers  # transformers 5.x: the tower itself

    def attention_update(self, hidden: torch.Tensor, bias: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out, _ = self.attention(hidden_states=self.module.layer_norm1(hidden), attention_mask=bias, **kwargs)
        return out

    def mlp_update(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module.mlp(self.module.layer_norm2(hidden))


class Dinov2Block:
    """One DINOv2 encoder layer (``Dinov2Layer``): ``x + drop_path(layer_scale1(attention(norm1(x))))``,
    then ``x + drop_path(layer_scale2(mlp(norm2(x))))`` (layer-scale on both residual branches; ``drop_path``
    is the identity in eval mode).

    Two layouts of the attention module: transformers >= 5.2x's ``Dinov2Attention`` with ``q_proj`` /
    ``k_proj`` / ``v_proj`` / ``o_proj`` (it takes an additive mask: the bias goes through the module and
    the model's backend), and the earlier ``attention.attention`` (``Dinov2SelfAttention``: ``query`` /
    ``key`` / ``value``, ``attention_head_size``) plus ``attention.output.dense``, whose forward takes no
    mask: there the biased attention is computed here with ``scaled_dot_product_attention`` over the
    module's own projections and scaling (the same function as its SDPA backend; dropout 0 in eval)."""

    def __init__(self, layer: nn.Module) -> None:
        self.module, self.attention = layer, layer.attention  # its input is norm1(x) in both layouts
        inner = getattr(layer.attention, "attention", None)
        self.split = inner is not None  # the earlier layout
        if self.split:
            self.q_proj, self.k_proj, self.v_proj = inner.query, inner.key, inner.value
            self.heads: int = inner.num_attention_heads
            self.head_dim: int = inner.attention_head_size
            self.scaling: float = inner.scaling
        else:
            attn = layer.attention
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
            self.heads, self.head_dim, self.scaling = attn.num_attention_heads, attn.head_dim, attn.scaling

    @staticmethod
    def layers_of(tower: nn.Module) -> nn.ModuleList:
        return tower.encoder.layer

    def attention_update(self, hidden: torch.Tensor, bias: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        layer = self.module
        normed = layer.norm1(hidden)
        if self.split:
            batch, length, _ = normed.shape
            q, k, v = (proj(normed).view(batch, length, self.heads, self.head_dim).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scaling)
            out = layer.attention.output(out.transpose(1, 2).reshape(batch, length, -1), normed)
        else:
            out, _ = layer.attention(normed, attention_mask=bias, **kwargs)
        return layer.drop_path(layer.layer_scale1(out))

    def mlp_update(self, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.module
        return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(hidden))))


# vision_config.model_type -> (its layers' description, token 0 is a CLS token)
ENCODERS: dict[str, tuple[type[ClipSiglipBlock] | type[Dinov2Block], bool]] = {
    "clip_vision_model": (ClipSiglipBlock, True),
    "siglip_vision_model": (ClipSiglipBlock, False),
    "dinov2": (Dinov2Block, True),
}


class LlavaTower:
    """The vision tower of a LLaVA model (a :class:`tokenreduce.context.EncoderTower`): CLIP (LLaVA-NeXT-Video),
    SigLIP (LLaVA-OneVision) or DINOv2 (e.g. the project's organism), chosen by the tower config's
    ``model_type`` (:data:`ENCODERS`): ``blocks`` of pre-norm encoder layers, each described by
    :meth:`block`, over the patch tokens of an image/frame after a CLS token when ``has_cls``."""

    def __init__(self, model: nn.Module, base: nn.Module, bilinear_pooling: bool) -> None:
        self.model, self.encoders, self.module = model, base, base.vision_tower
        self.bilinear_pooling = bilinear_pooling
        self.config = self.module.config
        kind = self.config.model_type
        if kind not in ENCODERS:
            raise ValueError(f"{type(model).__name__}'s vision tower is a {kind!r} model; the methods that hook "
                             f"the tower (visionzip, tome-vision) support {', '.join(ENCODERS)}")
        self.block_type, self.has_cls = ENCODERS[kind]
        self.blocks: nn.ModuleList = self.block_type.layers_of(self.module)

    def block(self, layer: nn.Module) -> ClipSiglipBlock | Dinov2Block:
        """The description of one of ``blocks`` (its attention module, projections, residual branches)."""
        return self.block_type(layer)

    def patches(self, pixel_values: torch.Tensor) -> int:
        """Patch tokens per image/frame of ``pixel_values`` ``[..., H, W]`` (DINOv2 interpolates its position
        embeddings, so this follows the input, not ``config.image_size``)."""
        size = self.config.patch_size
        ph, pw = (size, size) if isinstance(size, int) else size
        return (pixel_values.shape[-2] // ph) * (pixel_values.shape[-1] // pw)

    def probe(self, layer: int | None) -> LlavaTowerProbe:
        return LlavaTowerProbe(self.model, self.encoders, layer, self.bilinear_pooling, self)


__all__ = ["ClipSiglipBlock", "Dinov2Block", "ENCODERS", "LlavaTower", "QwenTower"]
