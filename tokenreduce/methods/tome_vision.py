"""ToMe inside the vision tower (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) for the
CLIP / SigLIP / DINOv2 towers of LLaVA-OneVision and LLaVA-NeXT-Video."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch

from ..context import EncoderTower, MethodContext
from ..threads import PerThread
from ..vision.tome import EncoderBlock, TowerPass, tome_layer, unmerge
from .base import VisualMethod
from .options import Fraction, Integer, option


@dataclass
class TomeVision(VisualMethod):
    """In every encoder layer of the vision tower, between attention and MLP, merge ``r`` tokens per
    frame by bipartite matching on the layer's keys (size-weighted means, sizes carried), with
    proportional attention (``log size`` added to the attention logits through SDPA's additive mask);
    see :mod:`tokenreduce.vision.tome`. A CLS token (CLIP, DINOv2) is never merged. The layer's structure
    comes from the tower's description (``ctx.tower().block(layer)``): the merge sits after the attention
    branch's residual add (after DINOv2's layer-scale) and before the MLP branch. The tower's output is
    unmerged (every patch gets its token's features), so the projector, LLaVA's pooling and the LLM run
    unchanged on the full grid: the saving is the tower's time; compose with an LLM-stage method
    (``["tome-vision", "framefusion"]``) to cut the LLM's tokens too.

    ``retention`` (default 0.5): the fraction of a frame's patch tokens left after the last layer,
    spread as a constant ``r = ceil(patches * (1 - retention) / layers)`` per layer (ToMe's schedule; ``patches``
    of the frames actually encoded, e.g. 64 for DINOv2/14 at 112 px whatever its pretrained size);
    or ``r`` directly (``r=0`` is the dense tower). Implemented from the paper, not from its code.
    Deviation: the matching takes keys averaged over heads from the layer's own attention (as the
    paper), and merged tokens stay in their original order where ToMe's code returns ``[unmerged A, B]``
    after each layer. Attention does not depend on the order but the next layer's alternating A/B split
    does, so from the second layer on the two pair different tokens (same counts). Refused on Qwen-VL (its
    merge units feed M-RoPE): use ``static`` there.
    """

    name: ClassVar[str] = "tome-vision"
    description: ClassVar[str] = ("token merging inside CLIP/SigLIP/DINOv2 vision towers "
                                  "(ToMe; LLaVA-OneVision/-NeXT-Video)")
    stages: ClassVar[tuple[str, ...]] = ("vision",)

    retention: float | None = option(None, Fraction(none=True))
    r: int | None = option(None, Integer(0, none=True))

    def validate(self) -> None:
        if self.retention is not None and self.r is not None:
            raise ValueError("tome-vision: give either retention or r, not both")
        if self.r is None and self.retention is None:
            self.retention = 0.5

    def act_layers(self, num_layers: int) -> set[int]:
        return set()

    def setup(self, ctx: MethodContext) -> None:
        if "token_merge" not in ctx.features:
            raise ValueError(f"tome-vision merges tokens inside CLIP/SigLIP/DINOv2 towers; {ctx.architecture} "
                             f"has none. Supported: {', '.join(ctx.supported('token_merge'))}. For Qwen-VL video "
                             "use static")
        TomeTower(ctx, self)


class TomeTower:
    """Hooks of one ``tome-vision`` method on one LLaVA model's CLIP / SigLIP / DINOv2 tower: they run
    :mod:`tokenreduce.vision.tome` inside the vision tower and unmerge what the tower returns."""

    ctx = PerThread()  # TowerPass of the tower call running in this thread, else None
    r = PerThread()  # tokens merged per layer in that call

    def __init__(self, ctx: MethodContext, method: TomeVision) -> None:
        self.method, self.publish = method, ctx.publish_vision
        self.tower: EncoderTower = ctx.tower()
        self.layers, self.cls = self.tower.blocks, self.tower.has_cls
        ctx.wrap(self.tower.module, "forward", self._tower)
        for layer in self.layers:
            block = self.tower.block(layer)
            ctx.wrap(layer, "forward", partial(self._layer, block))
            ctx.add_hook(block.k_proj.register_forward_hook(self._keys))

    def per_layer(self, patches: int) -> int:
        """Tokens merged in each layer: ``r``, or spread evenly so ``retention`` of the ``patches`` remain."""
        if self.method.r is not None:
            return self.method.r
        return math.ceil(patches * (1 - self.method.retention) / len(self.layers))

    def _keys(self, module, args, output: torch.Tensor) -> None:
        if self.ctx is not None:
            self.ctx.keys = output

    def _layer(self, block: EncoderBlock, original, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.ctx is None:  # the layer's own forward, called as the tower called it
            return original(hidden_states, *args, **kwargs)
        if len(args) > 1:
            raise TypeError(f"tome-vision: a vision encoder layer was called with {1 + len(args)} positional "
                            "arguments; it handles (hidden_states, attention_mask)")
        mask = args[0] if args else kwargs.pop("attention_mask", None)
        return tome_layer(block, self.ctx, self.r, self.cls, hidden_states, mask, **kwargs)

    def _tower(self, original, pixel_values: torch.Tensor, *args: Any, **kwargs: Any):
        frames = pixel_values.shape[0]
        patches = self.tower.patches(pixel_values)
        n = patches + int(self.cls)
        device = pixel_values.device
        self.ctx = ctx = TowerPass(size=torch.ones(frames, n, device=device),
                                   source=torch.arange(n, device=device).expand(frames, n))
        self.r = self.per_layer(patches)
        try:
            out = original(pixel_values, *args, **kwargs)
        finally:
            self.ctx = self.r = None
        full = ctx.source  # the last layer's map
        for key in ("last_hidden_state",):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor) and value.shape[1] != n:
                setattr(out, key, unmerge(value, full))
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(self._unmerge_state(h, ctx, n) for h in out.hidden_states)
        tokens = ctx.tokens_per_layer
        encoded = sum(tokens) / len(tokens) if tokens else n
        self.publish({}, {"patches_in": frames * n, "patches_encoded": round(frames * encoded),
                          "tokens_per_layer": tokens,
                          "items": [{"kind": "frames", "frames": frames, "tokens_in": n,
                                     "tokens_out": tokens[-1] if tokens else n, "tokens_per_layer": tokens}]})
        return out

    @staticmethod
    def _unmerge_state(h: torch.Tensor, ctx: TowerPass, n: int) -> torch.Tensor:
        if h is None or h.shape[1] == n:  # not captured (transformers records only the layers read), or full
            return h
        source = ctx.source_of(h)
        if source is None:  # a copy of the last layer's output (e.g. after a final norm)
            source = ctx.source
        return unmerge(h, source)
