"""tokenreduce.methods.pre_llm, the selection the vLLM plugin shares with the HF side (pure torch: runs in
both environments)."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.methods.evs import evs_keep
from tokenreduce.methods.pre_llm import framefusion_count, framefusion_merge, reduce_video, video_token_count


def _video(frames=6, cells=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, cells, dim, generator=g)


@pytest.mark.parametrize("method", ["evs", "framefusion"])
@pytest.mark.parametrize("retention", [0.1, 0.37, 0.5, 1.0])
def test_count_fixed_in_advance(method, retention):
    video = _video()
    index, embeds = reduce_video(method, video, retention)
    count = video_token_count(method, 6, 5, retention)
    assert index.shape == (count,) and embeds.shape == (count, 8)
    assert torch.equal(index, index.sort().values) and index.unique().numel() == count
    assert (index[:5] == torch.arange(5)).all()  # the first frame is always kept
    if retention == 1.0:
        assert torch.equal(index, torch.arange(30)) and torch.equal(embeds, video.reshape(30, 8))


def test_counts():
    assert framefusion_count(6, 5, 0.37) == 12  # ceil(11.1)
    assert framefusion_count(6, 5, 0.05) == 5  # never below one frame
    assert framefusion_count(1, 5, 0.3) == 5  # a single frame has nothing to merge into
    assert video_token_count("evs", 6, 5, 0.37) == 11  # vLLM's int(...) rounding
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


def test_bad_input():
    with pytest.raises(ValueError, match="frames, cells, dim"):
        reduce_video("evs", torch.zeros(4, 8), 0.5)
    with pytest.raises(ValueError, match="retention must be a number in"):
        reduce_video("framefusion", _video(), 0.0)
