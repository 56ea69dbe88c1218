"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: visual runs described by ``image_grid_thw`` / ``video_grid_thw``,
3-D M-RoPE."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layout import IMAGE, VIDEO, ItemSpec
from .base import ModelAdapter, split_per_sample
from .towers import QwenTower


class QwenVLAdapter(ModelAdapter):
    """One LLM token per ``spatial_merge_size**2`` patches; a video frame is a temporal patch
    (``temporal_patch_size`` input frames). Positions are Qwen's 3-D M-RoPE ``(t, h, w)``, built by
    the model from the full prompt; the engine slices the resulting cos/sin per kept row."""

    name = "qwen-vl"
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    features = frozenset({"merge_units"})

    def tower(self, model: nn.Module) -> QwenTower:
        return QwenTower(model, self.base_model(model))

    def item_specs(self, model: nn.Module, kwargs: dict[str, Any], runs: dict[int, list[list[list[int]]]],
                   repeat: int = 1) -> dict[int, list[list[ItemSpec]]]:
        merge = model.config.vision_config.spatial_merge_size
        out = {}
        for kind, key, what in ((IMAGE, "image_grid_thw", "image"), (VIDEO, "video_grid_thw", "video")):
            grid = kwargs.get(key)
            rows = [] if grid is None else grid.tolist()
            specs = [ItemSpec(kind, t, h // merge, w // merge, runs=self.runs_per_item(kind, t)) for t, h, w in rows]
            out[kind] = split_per_sample(runs[kind], specs, what, repeat)
        return out

    def runs_per_item(self, kind: int, frames: int) -> int:
        return 1


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL writes each video frame as its own run (``<t seconds><vision_start>...<vision_end>``)
    and adds "deepstack" visual features to the visual rows of its first LLM layers; the engine
    routes those to the rows that survive (size-weighted for merged rows)."""

    name = "qwen3-vl"
    classes = ("Qwen3VLForConditionalGeneration",)
    deepstack = True

    def runs_per_item(self, kind: int, frames: int) -> int:
        return frames if kind == VIDEO else 1
