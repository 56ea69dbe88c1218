"""tokenreduce.methods.pre_llm, the selection the vLLM plugin shares with the HF side (pure torch: runs in
both environments)."""

from __future__ import annotations

import pytest
import torch
from tokenreduce_vllm import settings

from tokenreduce.methods import REGISTRY
from tokenreduce.methods.aim import aim_frame_count, aim_merge
from tokenreduce.methods.base import Method
from tokenreduce.methods.capabilities import PreLLM
from tokenreduce.methods.evs import evs_keep
from tokenreduce.methods.framefusion import framefusion_count, framefusion_merge
from tokenreduce.methods.pre_llm import pre_llm_methods, reduce_video, video_token_count
from tokenreduce.methods.sms import sms_keep


def _video(frames=6, cells=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, cells, dim, generator=g)


@pytest.mark.parametrize("method", pre_llm_methods())
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


def test_the_pre_llm_methods_are_the_classes_declaring_it_in_their_declared_order():
    """The order is each method's index in the vLLM plugin's per-video settings tensor and the order of its
    messages: these four, as before the capability was declared on the classes."""
    assert pre_llm_methods() == ("evs", "framefusion", "aim", "sms")
    assert [REGISTRY[m].pre_llm.default_retention for m in pre_llm_methods()] == [0.3, 0.3, 0.25, 0.3]
    orders = [c.pre_llm.order for c in REGISTRY.values() if getattr(c, "pre_llm", None) is not None]
    assert len(orders) == len(set(orders))
    assert settings.supported().startswith("evs (retention in (0, 1], default 0.3), framefusion ")
    for i, method in enumerate(pre_llm_methods()):
        row = settings.Settings(method, 0.37).to_tensor(2)
        assert row[:, 0].tolist() == [i, i] and settings.Settings.from_tensor(row[1]) == settings.Settings(method, 0.37)


def test_in_llm_options_name_what_the_pre_llm_form_leaves_out():
    with pytest.raises(ValueError, match=r"unknown option\(s\) merge_layers \(vLLM runs FrameFusion's merge stage"):
        settings.parse({"method": "framefusion", "merge_layers": 2})
    with pytest.raises(ValueError, match=r"unknown option\(s\) prune$"):  # EVS leaves nothing out: no note
        settings.parse({"method": "evs", "prune": True})


class KeepFirstFrame(Method):
    """A pre-LLM method declared outside tokenreduce: keeps the first ``count`` tokens in frame order."""

    name = "keep-first"
    stages = ("embed",)
    pre_llm = PreLLM(order=99, count=lambda frames, cells, retention: cells,
                     select=lambda video, retention: (torch.arange(video.shape[0])[:, None].expand(
                         video.shape[:2]) == 0, video),
                     default_retention=0.5, note="keeps the first frame only")


def test_a_method_declaring_pre_llm_is_served_with_no_other_edit(monkeypatch):
    """Declaring the capability is the whole change: the pre-LLM list, the count, the reduction and the vLLM
    plugin's settings (method index, default retention, note) follow from REGISTRY."""
    monkeypatch.setitem(REGISTRY, KeepFirstFrame.name, KeepFirstFrame)
    assert pre_llm_methods()[-1] == "keep-first"
    video = _video(frames=3, cells=4)
    assert video_token_count("keep-first", 3, 4, 0.5) == 4
    index, embeds = reduce_video("keep-first", video, 0.5)
    assert index.tolist() == [0, 1, 2, 3] and torch.equal(embeds, video[0])
    parsed = settings.parse({"method": "keep-first"})
    assert parsed == settings.Settings("keep-first", 0.5)
    assert settings.Settings.from_tensor(parsed.to_tensor(1)[0]) == parsed
    assert "keep-first (retention in (0, 1], default 0.5)" in settings.supported()
    with pytest.raises(ValueError, match=r"unknown option\(s\) x \(keeps the first frame only\)"):
        settings.parse({"method": "keep-first", "x": 1})


def test_a_wrongly_typed_capability_is_refused(monkeypatch):
    class Broken(Method):
        name = "broken"
        pre_llm = {"count": len}

    monkeypatch.setitem(REGISTRY, Broken.name, Broken)
    with pytest.raises(TypeError, match="Broken.pre_llm must be a tokenreduce.methods.capabilities.PreLLM"):
        pre_llm_methods()
