"""Shared fixtures: tiny random-weight models of every supported family, built from configs."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.testing import FAMILIES, MODELS, make_frames, make_inputs, tiny_model

torch.manual_seed(0)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(params=MODELS)
def model_name(request) -> str:
    """Every tiny model: the families and their tower variants (LLaVA-NeXT-Video with DINOv2)."""
    return request.param


@pytest.fixture
def model(family):
    return tiny_model(family)


def video_inputs(model, n: int = 1, frames: int = 8, text_lens=None, static: bool = False):
    videos = [make_frames(frames, seed=i, static=static) for i in range(n)]
    return make_inputs(model, videos=videos, text_lens=text_lens)


def last_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1].float()


GRID = {"pixel_values_videos": "video_grid_thw", "pixel_values": "image_grid_thw"}


def sample_of(inputs: dict, b: int) -> dict:
    """Sample ``b`` of a left-padded batch, unpadded, as it would be prepared alone."""
    pad = int((inputs["attention_mask"][b] == 0).sum())
    out = {}
    for key, value in inputs.items():
        if key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            out[key] = value[b:b + 1, pad:]
        elif key in ("video_grid_thw", "image_grid_thw"):
            out[key] = value[b:b + 1]
        elif GRID.get(key) in inputs:  # Qwen: the patches of all items, flattened
            sizes = inputs[GRID[key]].prod(-1).tolist()
            start = sum(sizes[:b])
            out[key] = value[start:start + sizes[b]]
        else:
            out[key] = value[b:b + 1]
    return out
