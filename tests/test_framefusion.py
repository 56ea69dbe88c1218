"""FrameFusion's own behaviour: what merges, when merging stops, budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import video_inputs

import tokenreduce
from tokenreduce.testing import tiny_model


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_next_video"])
def test_static_video_folds_every_frame_into_the_first(family):
    """Identical frames: every later frame's token has similarity 1 to the same cell before it,
    so at layer 0 all of them merge into the first frame and no pruning is needed."""
    model = tiny_model(family)
    inputs = video_inputs(model, frames=8, static=True)
    layout_frames = 4 if family.startswith("qwen") else 8
    tokenreduce.patch(model, "framefusion", retention=1 / layout_frames)
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    n = s.visual_tokens_in[0]
    assert s.visual_tokens_kept == [n // layout_frames]
    grid = s.kept_grid(0, 0, layer=0)
    assert grid[0].all() and not grid[1:].any()
    assert s.kept_indices[0][0] == s.kept_indices[0][-1]  # budget met by merging: no pruning


def test_merging_respects_the_budget_by_most_similar_first():
    model = tiny_model("llava_next_video")
    inputs = video_inputs(model, frames=8, static=True)
    tokenreduce.patch(model, "framefusion", retention=0.5)
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    assert s.visual_tokens_kept == [64]
    assert s.layer_tokens[0] == inputs["input_ids"].shape[1] - 64


def test_ratio_lower_bound_one_means_prune_only():
    model = tiny_model("llava_onevision")
    inputs = video_inputs(model)
    tokenreduce.patch(model, "framefusion", retention=0.3, ratio_lower_bound=1.0)
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    length = inputs["input_ids"].shape[1]
    assert s.layer_tokens[0] == length  # nothing merged before layer 0
    assert s.visual_tokens_kept == [-(-129 * 3 // 10)]  # pruned before layer 1 by layer 0's attention
    assert s.layer_tokens[1] == length - 129 + 39


def test_threshold_one_still_merges_exact_duplicates():
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model, static=True)
    tokenreduce.patch(model, "framefusion", retention=0.5, similarity_threshold=1.0, ratio_lower_bound=0.0)
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    # threshold 1.0 still merges exact duplicates; a static video is exactly that
    assert s.layer_tokens[0] < inputs["input_ids"].shape[1]


def test_paper_alias_and_cost_budget():
    ff = tokenreduce.FrameFusion(similarity_lower_bound=0.8)
    assert ff.similarity_threshold == 0.8 and ff.retention == 0.3
    model = tiny_model("llava_onevision")
    inputs = video_inputs(model)
    tokenreduce.patch(model, "framefusion", cost=0.3)
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    visual_rows = sum(
        sum(1 for i in rows if i in set(torch.nonzero(inputs["input_ids"][0] == 511).flatten().tolist()))
        for rows in s.kept_indices[0])
    # merged rows count once: the visual work over all 4 layers stays within the cost budget
    assert visual_rows <= 0.3 * 4 * 129 + 4
    assert s.visual_tokens_kept[0] < 129
