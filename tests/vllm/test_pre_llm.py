"""tokenreduce.methods.pre_llm, the selection the vLLM plugin shares with the HF side (pure torch: runs in
both environments)."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.methods.aim import aim_frame_count
from tokenreduce.methods.evs import evs_keep
from tokenreduce.methods.pre_llm import (
    PRE_LLM_METHODS,
    aim_merge,
    framefusion_count,
    framefusion_merge,
    reduce_video,
    sms_keep,
    video_token_count,
)


def _video(frames=6, cells=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, cells, dim, generator=g)


@pytest.mark.parametrize("method", PRE_LLM_METHODS)
@pytest.mark.parametrize("retention", [0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("cells", [1, 5, 12])
def test_count_fixed_in_advance(method, retention, cells):
    video = _video(cells=cells)
    index, embeds = reduce_video(method, video, retention)
    count = video_token_count(method, 6, cells, retention)
    assert index.shape == (count,) and embeds.shape == (count, 8)
    assert torch.equal(index, index.sort().values) and index.unique().numel() == count
    if method in ("evs", "framefusion"):  # the first frame is always kept
        assert (index[:cells] == torch.arange(cells)).all()
    if method == "aim":  # each frame's first token is its group's earliest member
        assert set(range(0, 6 * cells, cells)) <= set(index.tolist())
    if retention == 1.0:
        assert torch.equal(index, torch.arange(6 * cells)) and torch.equal(embeds, video.reshape(-1, 8))


def test_counts():
    assert framefusion_count(6, 5, 0.37) == 12  # ceil(11.1)
    assert framefusion_count(6, 5, 0.05) == 5  # never below one frame
    assert framefusion_count(1, 5, 0.3) == 5  # a single frame has nothing to merge into
    assert video_token_count("evs", 6, 5, 0.37) == 11  # vLLM's int(...) rounding
    assert aim_frame_count(196, 0.25) == 49 and video_token_count("aim", 6, 196, 0.25) == 6 * 49
    assert video_token_count("sms", 6, 5, 0.37) == 6 * 2 and video_token_count("sms", 6, 5, 0.01) == 6
    with pytest.raises(ValueError, match="unknown pre-LLM method 'fastv'"):
        video_token_count("fastv", 6, 5, 0.3)


def test_evs_is_the_shared_rule():
    video = _video()
    index, embeds = reduce_video("evs", video, 0.4)
    assert torch.equal(index, evs_keep(video, 0.4).flatten().nonzero().flatten())
    assert torch.equal(embeds, video.reshape(30, 8)[index])


def test_framefusion_merges_duplicates_size_weighted():
    """A frame equal to its predecessor folds into it entirely; the run head becomes the size-weighted mean
    of its members (here: a chain of three tokens, two of them equal)."""
    video = _video(frames=3, cells=4)
    video[1] = video[0]
    video[2, 0] = video[0, 0] + 0.01  # nearly identical to frame 1, cell 0
    keep, merged = framefusion_merge(video, 0.5)  # 6 of 12 kept: 6 merges
    assert keep[0].all() and not keep[1].any()
    assert keep.sum() == 6 and not keep[2, 0]
    expected = (video[0, 0] * 2 + video[2, 0]) / 3
    assert torch.allclose(merged[0, 0], expected, atol=1e-6)
    index, embeds = reduce_video("framefusion", video, 0.5)
    assert torch.equal(index, keep.flatten().nonzero().flatten())
    assert torch.allclose(embeds[0], expected, atol=1e-6)


def test_aim_merges_duplicates_within_frames():
    """Two identical tokens in a frame merge first; the group keeps its earliest member's slot and holds
    the members' mean; frames never merge with each other."""
    video = _video(frames=2, cells=4)
    video[0, 1] = video[0, 0]  # an A token (slot 0) and its identical B token (slot 1)
    video[1] = video[0]
    keep, merged = aim_merge(video, 0.75)  # 3 of 4 per frame: one merge each
    assert keep.sum(dim=1).tolist() == [3, 3] and not keep[:, 1].any() and keep[:, 0].all()
    assert torch.allclose(merged[:, 0], video[0, 0].expand(2, -1))


def test_sms_keeps_the_most_typical_tokens():
    video = _video(frames=1, cells=6)
    video[0, :3] = video[0, 0] + 0.01 * torch.randn(3, 8)  # three near-copies dominate the frame's mean
    assert sms_keep(video, 0.5)[0].tolist() == [True, True, True, False, False, False]


def test_bad_input():
    with pytest.raises(ValueError, match="frames, cells, dim"):
        reduce_video("evs", torch.zeros(4, 8), 0.5)
    with pytest.raises(ValueError, match="retention must be a number in"):
        reduce_video("framefusion", _video(), 0.0)
