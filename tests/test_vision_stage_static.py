"""static: Qwen-VL video units that repeat the previous temporal patch are not encoded; the tower runs
on a partial grid and its output is expanded back to every placeholder."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from conftest import last_logits, sample_of
from transformers import vision_utils

import tokenreduce
from tokenreduce.methods.framefusion import FrameFusion
from tokenreduce.methods.static import Static
from tokenreduce.models.qwen_partial import partial_inputs
from tokenreduce.testing import make_frames, make_inputs
from tokenreduce.testing import tiny_model as _tiny_model
from tokenreduce.vision.static_units import plan_units, unit_changes

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SIDE = 112  # 8x8 patches, 4x4 units per temporal patch
_BUILT: list = []


@functools.cache
def _model(family: str, windowed_only: bool = False):
    model = _tiny_model(family, **({"vision_config": {"fullatt_block_indexes": []}} if windowed_only else {}))
    _BUILT.append(model)
    return model


def tiny_model(family: str, windowed_only: bool = False):
    """One model per family for the whole module (building them is the slow part); tests unpatch them."""
    return _model(family, windowed_only)


@pytest.fixture(autouse=True)
def _unpatch_after():
    yield
    for model in _BUILT:
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)


@functools.cache
def _frames(seed: int, frames: int) -> np.ndarray:
    return make_frames(frames, SIDE, seed=seed)


def videos(kind: str, frames: int = 8) -> np.ndarray:
    pan = _frames(0, frames)
    if kind == "pan":
        return pan
    if kind == "still":
        return np.repeat(pan[:1], frames, axis=0)
    # a cut after the first temporal patch, then a still shot: temporal patches A, B, B, B
    other = _frames(3, 1)
    return np.concatenate([pan[:2], np.repeat(other, frames - 2, axis=0)])


def inputs_for(model, kinds: list[str], frames: int = 8) -> dict:
    return make_inputs(model, videos=[videos(k, frames) for k in kinds], max_pixels=SIDE * SIDE)


def features(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return torch.cat(out.pooler_output)


@pytest.mark.parametrize("family", QWEN)
def test_nothing_static_is_the_dense_model(family):
    model = tiny_model(family)
    inputs = inputs_for(model, ["pan", "still"])
    dense = last_logits(model, inputs)
    for options in ({"threshold": 0.0}, {"retention": 1.0}):
        tokenreduce.patch(model, "static", **options)
        assert torch.equal(last_logits(model, inputs), dense)
        notes = tokenreduce.stats(model).stages["vision"]
        assert notes["patches_encoded"] == notes["patches_in"] == 2 * 4 * 64
        assert notes["static_fraction"] == 0


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("kind", ["still", "cut"])
def test_whole_static_temporal_patches_give_the_dense_features(family, kind):
    """Per-frame attention: when whole temporal patches repeat, the kept ones are encoded exactly as in
    the full tower, and every skipped unit gets exactly the features the full tower gives it."""
    model = tiny_model(family)
    inputs = inputs_for(model, [kind])
    dense = features(model, inputs)
    tokenreduce.patch(model, "static")
    assert torch.allclose(features(model, inputs), dense, atol=1e-5)
    with torch.no_grad():
        model(**inputs)
    notes = tokenreduce.stats(model).stages["vision"]
    kept_patches = {"still": 1, "cut": 2}[kind]
    assert notes["patches_encoded"] == kept_patches * 64
    assert notes["items"][0]["static_fraction"] == 1 - kept_patches / 4


def test_window_attention_over_the_kept_units_of_each_window():
    """Qwen2.5-VL with windowed blocks only: a window that is static as a whole can be skipped without
    changing anything; the kept window of the second temporal patch attends to its own kept units."""
    model = tiny_model("qwen2_5_vl", windowed_only=True)
    inputs = inputs_for(model, ["pan"], frames=4)
    pixels = inputs["pixel_values_videos"].view(2, 16, 4, -1).clone()  # temporal patch, unit, patch, values
    window0 = [0, 1, 4, 5]  # units (0,0) (0,1) (1,0) (1,1) of the 4x4 unit grid: the first 2x2 window
    rest = [u for u in range(16) if u not in window0]
    pixels[1, rest] = pixels[0, rest]
    pixels[1, window0] = torch.randn_like(pixels[1, window0])
    inputs["pixel_values_videos"] = pixels.view(128, -1)
    dense = features(model, inputs)
    tokenreduce.patch(model, "static")
    assert torch.allclose(features(model, inputs), dense, atol=1e-5)
    with torch.no_grad():
        model(**inputs)
    assert tokenreduce.stats(model).stages["vision"]["patches_encoded"] == (16 + 4) * 4


def test_partial_inputs_of_a_full_grid_are_transformers_own():
    model = tiny_model("qwen2_5_vl")
    grid = inputs_for(model, ["pan", "pan"])["video_grid_thw"]
    visual = model.model.visual
    units = int(grid.prod(-1).sum()) // 4
    mine = partial_inputs(visual, grid, torch.ones(units, dtype=torch.bool))
    order, bounds = vision_utils.get_vision_window_index(grid, 2, visual.window_size, visual.patch_size)
    assert torch.equal(mine["window_index"], order)
    assert torch.equal(mine["cu_window_seqlens"], bounds)
    assert torch.equal(mine["cu_seqlens"], vision_utils.get_vision_cu_seqlens(grid))
    assert torch.equal(mine["position_ids"], vision_utils.get_vision_position_ids(grid, 2))


def test_partial_grid_positions_and_boundaries():
    """Kept units keep their own rotary positions; attention segments count only kept units, and empty
    frames and windows disappear."""
    model = tiny_model("qwen2_5_vl")
    grid = torch.tensor([[2, 8, 8]])
    visual = model.model.visual
    keep = torch.ones(32, dtype=torch.bool)
    keep[16:] = False
    keep[16 + 5] = True  # one unit of the second temporal patch, in window 0
    mine = partial_inputs(visual, grid, keep)
    full = vision_utils.get_vision_position_ids(grid, 2)
    assert torch.equal(mine["position_ids"], full[keep.repeat_interleave(4)])
    assert mine["cu_seqlens"].tolist() == [0, 64, 68]
    assert mine["cu_window_seqlens"].tolist() == [0, 16, 32, 48, 64, 68]
    assert sorted(mine["window_index"].tolist()) == list(range(17))


def test_unit_changes_and_plan():
    grid = torch.tensor([[3, 4, 4]])
    pixels = torch.zeros(48, 6)
    pixels[16 + 4:16 + 8] = 1.0  # unit 1 of temporal patch 1 changes by 1; back to 0 in patch 2
    change = unit_changes(pixels, grid, 2)[0]
    assert torch.isinf(change[0]).all()
    assert change[1].tolist() == [0, 1, 0, 0] and change[2].tolist() == [0, 1, 0, 0]
    plan = plan_units(change, threshold=0.5, retention=None)
    assert plan.keep.view(3, 4).tolist() == [[True] * 4, [False, True, False, False], [False, True, False, False]]
    assert plan.rep.view(3, 4).tolist() == [[0, 1, 2, 3], [0, 5, 2, 3], [0, 9, 2, 3]]
    budget = plan_units(change, threshold=None, retention=0.5)  # 6 of 12 units kept: least changing skipped
    assert budget.encoded == 6 and budget.keep[:4].all()
    capped = plan_units(change, threshold=0.5, retention=0.25)  # never skips a unit changing >= threshold
    assert capped.encoded == 6


def test_positions_sizes_and_composition():
    model = tiny_model("qwen2_5_vl")
    inputs = inputs_for(model, ["cut"])
    tokenreduce.patch(model, "static")
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    visual = (s.layout.kind[0] > 0).nonzero().flatten()
    kept = torch.tensor(s.kept_indices[0][0])
    # the first two temporal patches' tokens stay, at their original positions; the rest merged into patch 2
    assert torch.equal(kept[torch.isin(kept, visual)], visual[:32])
    assert s.visual_tokens_kept == [32]
    tokenreduce.patch(model, [Static(), FrameFusion(retention=0.25)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    s = tokenreduce.stats(model)
    assert s.visual_tokens_kept == [16] and s.stages["vision"]["patches_encoded"] == 2 * 64
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_batch_equals_singles_and_generate_equals_forward(family):
    model = tiny_model(family)
    inputs = inputs_for(model, ["cut", "still"])
    inputs["input_ids"][1, -3:] += 1  # different questions
    tokenreduce.patch(model, "static")
    batch = last_logits(model, inputs)
    kept = tokenreduce.stats(model).visual_tokens_kept
    for b in range(2):
        assert torch.allclose(last_logits(model, sample_of(inputs, b)), batch[b:b + 1], atol=1e-5)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, num_beams=2)
    s = tokenreduce.stats(model)
    assert s.visual_tokens_kept == [kept[0], kept[0], kept[1], kept[1]]
    notes = s.stages["vision"]  # transformers >= 5.2x encodes once before expanding for beams, 5.17 after
    assert notes["patches_encoded"] * 8 == notes["patches_in"] * 3  # of 2 x 4 temporal patches, 2 + 1 encoded


def test_images_pass_through():
    model = tiny_model("qwen2_vl")
    inputs = make_inputs(model, images=[make_frames(1, SIDE)[0]], max_pixels=SIDE * SIDE)
    dense = last_logits(model, inputs)
    tokenreduce.patch(model, "static")
    assert torch.equal(last_logits(model, inputs), dense)
    assert "vision" not in tokenreduce.stats(model).stages


def test_unpatch_restores():
    model = tiny_model("qwen3_vl")
    inputs = inputs_for(model, ["cut"])
    dense = last_logits(model, inputs)
    tokenreduce.patch(model, "static")
    assert not torch.equal(last_logits(model, inputs), dense)
    tokenreduce.unpatch(model)
    assert "forward" not in model.model.visual.__dict__
    assert "get_video_features" not in model.model.__dict__
    assert torch.equal(last_logits(model, inputs), dense)


def test_clear_errors():
    with pytest.raises(ValueError, match="tome-vision"):
        tokenreduce.patch(tiny_model("llava_onevision"), "static")
    model = tiny_model("qwen2_vl")
    for bad in ({"threshold": -1}, {"retention": 0}, {"retention": 1.5}, {"threshold": "x"}):
        with pytest.raises(ValueError):
            tokenreduce.patch(model, "static", **bad)
    with pytest.raises(ValueError, match="before framefusion"):
        tokenreduce.patch(model, ["framefusion", "static"])
    with pytest.raises(ValueError, match="vision"):
        tokenreduce.patch(model, ["static", "tome-vision"])
    assert not tokenreduce.is_patched(model)
