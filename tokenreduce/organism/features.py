"""The tower's side of the organism, cached: what ``LlavaNextVideoModel.get_video_features`` computes
before its projector (DINOv2 layers 6 and 12 concatenated, CLS dropped, 2 x 2 max pooling), per video
``[8, 16, 768]``. Training runs the projector and the LLM on these, so the tower runs once per video;
``tests/test_organism.py`` checks that projector(cached) equals the model's own video features."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..eval.dinov2 import pixel_values
from .data import SIZE, Item, render


@torch.inference_mode()
def pre_projector(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[frames, tokens, 2 * 384]``: the tower's selected layers, CLS dropped, pooled by the model's own
    ``vision_resampler``, as ``get_video_features`` computes them before ``multi_modal_projector``."""
    inner = model.model
    out = inner.vision_tower(pixels, output_hidden_states=True, return_dict=True)
    layers = inner.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else layers
    selected = torch.cat([out.hidden_states[i] for i in layers], dim=-1)[:, 1:]
    return inner.vision_resampler(selected)


def cache_features(model: nn.Module, items: list[Item], path: Path, progress: bool = True) -> torch.Tensor:
    """Pre-projector features of every item's video, ``[N, 8, 16, 768]`` float16, computed once and kept
    at ``path`` (recomputed if the file holds a different number of videos)."""
    if path.is_file():
        feats = torch.load(path)
        if feats.shape[0] == len(items):
            return feats
    out = []
    for item in tqdm(items, desc="tower features", unit="video", disable=not progress):
        out.append(pre_projector(model, pixel_values(render(item.video), SIZE)).half())
    feats = torch.stack(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, path)
    return feats
