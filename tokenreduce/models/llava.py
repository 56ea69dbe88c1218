"""LLaVA-OneVision and LLaVA-NeXT-Video: runs of placeholder tokens, frames from the pixel tensor, 1-D RoPE."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..layout import IMAGE, VIDEO, ItemSpec
from .base import ModelAdapter
from .towers import LlavaTower


class LlavaVideoAdapter(ModelAdapter):
    """A video run holds ``frames * tokens_per_frame`` pooled patch tokens (plus, when ``video_newline``,
    one trailing ``image_newline`` token that belongs to no frame). Images (any-resolution tiles
    with newline tokens) have no frame grid we rely on: an image is one frame of ``n`` tokens.
    ``bilinear_pooling``: video features are pooled bilinearly (OneVision), else by LLaVA-NeXT-Video's strided
    pooling (``spatial_pool_mode``: average, max or conv). The tower (:class:`.towers.LlavaTower`) is CLIP,
    SigLIP or DINOv2."""

    features = frozenset({"token_merge"})
    video_newline: bool = False
    bilinear_pooling: bool = False

    def tower(self, model: nn.Module) -> LlavaTower:
        return LlavaTower(model, self.base_model(model), self.bilinear_pooling)

    def item_specs(self, model: nn.Module, kwargs: dict[str, Any], runs: dict[int, list[list[list[int]]]],
                   repeat: int = 1) -> dict[int, list[list[ItemSpec]]]:
        extra = 1 if self.video_newline else 0
        pixels = kwargs.get("pixel_values_videos")
        videos = []
        for sample_runs in runs[VIDEO]:
            specs = []
            for _, length in sample_runs:
                if pixels is None:
                    raise ValueError("the prompt has video tokens but no pixel_values_videos were given")
                frames = pixels.shape[1]
                per_frame, rest = divmod(length - extra, frames)
                if rest:
                    raise ValueError(f"a run of {length} video tokens does not split into {frames} frames"
                                     f"{' plus a newline token' if extra else ''}")
                side = math.isqrt(per_frame)
                gh, gw = (side, side) if side * side == per_frame else (1, per_frame)
                specs.append(ItemSpec(VIDEO, frames, gh, gw, extra))
            videos.append(specs)
        images = [[ItemSpec(IMAGE, 1, 1, length) for _, length in sample_runs] for sample_runs in runs[IMAGE]]
        return {IMAGE: images, VIDEO: videos}


class LlavaOnevisionAdapter(LlavaVideoAdapter):
    name = "llava-onevision"
    classes = ("LlavaOnevisionForConditionalGeneration",)
    video_newline = True
    bilinear_pooling = True


class LlavaNextVideoAdapter(LlavaVideoAdapter):
    name = "llava-next-video"
    classes = ("LlavaNextVideoForConditionalGeneration",)
