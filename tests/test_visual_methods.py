"""AIM, SMS, PyramidDrop, EVS and ShortV: each method's own rule, on constructed inputs where the
right answer is known, and composition."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import last_logits, video_inputs

import tokenreduce
from tokenreduce.layout import TEXT, VIDEO
from tokenreduce.methods import FastV, Selection, Step, VisualMethod
from tokenreduce.methods.aim import AIM
from tokenreduce.methods.evs import evs_count, evs_keep
from tokenreduce.methods.shortv import ShortV
from tokenreduce.methods.sms import SMS
from tokenreduce.ops.knee import knee_count
from tokenreduce.ops.rank import group_rank
from tokenreduce.testing import make_frames, make_inputs, tiny_model


def one_frame_step(hidden: torch.Tensor, frames: int = 1) -> Step:
    """A Step over one video of ``frames`` frames whose rows are ``hidden`` ``[1, L, D]`` (no text)."""
    length = hidden.shape[1]
    cells = length // frames
    rows = torch.arange(length)[None]
    return Step(layer=0, num_layers=4, hidden=hidden, rows=rows, size=torch.ones(1, length),
                kind=torch.full((1, length), VIDEO), item=torch.zeros(1, length, dtype=torch.long),
                frame=rows // cells, cell=rows % cells, importance=None, visual_in=torch.tensor([length]),
                max_frames=frames, max_cells=cells, max_items=1)


# ops ----------------------------------------------------------------------------------------------
def test_knee_of_constructed_long_tail_curves():
    n, k = 100, 10
    i = torch.arange(n).float()
    broken = torch.where(i < k, 1 - 0.9 * i / k, 0.1 - 0.05 * (i - k) / (n - k))  # a corner at k
    assert knee_count(broken[None], torch.tensor([n])).item() == k  # the points before the corner
    assert knee_count(broken[None], torch.tensor([n]), "slope").item() == k
    straight = 1 - i / n  # no long tail: nothing to cut
    assert knee_count(straight[None], torch.tensor([n])).item() == n
    # rows of different lengths in one call, padding ignored
    padded = torch.stack([broken, torch.cat([broken[:50] * 0 + torch.linspace(1, 0, 50), torch.full((50,), 9.)])])
    assert knee_count(padded, torch.tensor([n, 50])).tolist() == [k, 50]
    assert knee_count(torch.zeros(2, 0), torch.tensor([0, 0])).tolist() == [0, 0]
    with pytest.raises(ValueError, match="unknown knee rule 'x'; available: kneedle, slope"):
        knee_count(broken[None], torch.tensor([n]), "x")


def test_group_rank_is_per_group_and_stable():
    scores = torch.tensor([[3.0, 1, 2, 5, 5, 0, 7]])
    group = torch.tensor([[0, 0, 1, 1, 1, -1, 0]])
    assert group_rank(scores, group).tolist() == [[1, 2, 2, 0, 1, 7, 0]]


# evs ----------------------------------------------------------------------------------------------
def test_evs_count_is_vllms_rule():
    assert evs_count(8, 16, 0.3) == max(16, int(8 * 16 * 0.3)) == 38
    assert evs_count(2, 16, 0.1) == 16  # never less than one frame
    assert evs_count(8, 16, 1.0) == 128


def test_evs_keeps_first_frame_and_the_most_changed_tokens():
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8)
    x[1] = x[0]  # frame 1 repeats frame 0 exactly
    x[2, :3] = x[1, :3] + 0.001  # half of frame 2 barely changes
    keep = evs_keep(x, 0.5)
    assert keep.sum() == evs_count(4, 6, 0.5) == 12
    assert keep[0].all() and not keep[1].any() and not keep[2, :3].any()


def test_hf_evs_keeps_what_evs_keep_keeps():
    """The Hugging Face method and the shared function (what the vLLM plugin calls) agree."""
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("x", (args[0] if args else kwargs["hidden_states"]).clone())

    h = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    last_logits(model, inputs)
    h.remove()
    video = (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()
    t, gh, gw = inputs["video_grid_thw"][0].tolist()
    cells = gh * gw // 4
    expected = evs_keep(seen["x"][0, video].view(t, cells, -1), 0.3).flatten()
    tokenreduce.patch(model, "evs", retention=0.3)
    last_logits(model, inputs)
    kept = set(tokenreduce.stats(model).kept_indices[0][0])
    assert [int(v) in kept for v in video] == expected.tolist()


# aim ----------------------------------------------------------------------------------------------
def test_aim_merges_identical_tokens_first_into_the_earliest_member():
    torch.manual_seed(0)
    hidden = torch.randn(1, 6, 16)
    hidden[0, 5] = hidden[0, 2]  # A-set cell 2 and B-set cell 5 are identical
    dest = AIM(retention=5 / 6, prune=False).reduce(one_frame_step(hidden)).dest[0].tolist()
    assert dest == [0, 1, 2, 3, 4, 2]  # one merge: 5 into 2 (the earlier member keeps its position)


@pytest.mark.parametrize("retention, rounds, left", [(0.25, None, 4), (0.5, None, 8), (0.3, None, 5),
                                                      (1.0, 2, 4), (1.0, 1, 8)])
def test_aim_keeps_the_target_per_frame_and_sizes_add_up(retention, rounds, left):
    torch.manual_seed(1)
    hidden = torch.randn(1, 32, 8)  # two frames of 16
    dest = AIM(retention=retention, rounds=rounds, prune=False).reduce(one_frame_step(hidden, frames=2)).dest[0]
    rows = torch.arange(32)
    keep = dest == rows
    assert keep[:16].sum() == keep[16:].sum() == left
    assert (dest[:16] < 16).all() and (dest[16:] >= 16).all()  # merges stay inside their frame
    assert keep[dest].all()  # every token points at a kept representative
    assert (dest <= rows).all()  # the representative is the earliest member


def test_aim_schedule_prunes_progressively_to_nothing():
    model = tiny_model("llava_onevision", text_config={"num_hidden_layers": 8})
    inputs = video_inputs(model)
    tokenreduce.patch(model, "aim", retention=1.0)  # no merging: the schedule alone
    last_logits(model, inputs)
    s = tokenreduce.stats(model)
    visual = [sum(1 for i in layer if s.layout.kind[0, i] >= VIDEO - 1) for layer in s.kept_indices[0]]
    n = s.visual_tokens_in[0]
    # start 4, end min(6, 6): drops before layers 5, 6, 7 to 2/3, 1/3, 0 of the visual tokens
    assert visual == [n] * 5 + [math.ceil(n * 2 / 3), math.ceil(n / 3), 0]


def test_aim_bad_schedule_names_the_depth():
    with pytest.raises(ValueError, match="prune_end <= 2"):
        tokenreduce.patch(tiny_model("qwen2_vl"), "aim", prune_start=1, prune_end=3)
    with pytest.raises(ValueError, match="before prune_start"):
        AIM(prune_start=3, prune_end=1)


# pyramiddrop --------------------------------------------------------------------------------------
def test_pyramiddrop_halves_per_stage():
    model = tiny_model("llava_next_video", text_config={"num_hidden_layers": 8})
    tokenreduce.patch(model, "pyramiddrop")
    last_logits(model, video_inputs(model))
    s = tokenreduce.stats(model)
    n = s.visual_tokens_in[0]
    visual = [sum(1 for i in layer if s.layout.kind[0, i] > TEXT) for layer in s.kept_indices[0]]
    assert visual == [n] * 2 + [math.ceil(n / 2)] * 2 + [math.ceil(n / 4)] * 2 + [math.ceil(n / 8)] * 2


# sms ----------------------------------------------------------------------------------------------
def test_sms_keeps_the_tokens_before_the_knee():
    torch.manual_seed(0)
    hidden = torch.zeros(1, 20, 32)
    hidden[0, :5, 0] = 1 + 0.01 * torch.rand(5)  # five tokens carry the frame's content ...
    hidden[0, 5:, 1:16] = 0.5 * torch.eye(15)  # ... the rest is a flat tail of unrelated tokens
    step = one_frame_step(hidden)
    keep = SMS(second_round=False).first_round(step)[0]
    assert keep.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    capped = SMS(retention=0.1, second_round=False).first_round(one_frame_step(hidden))[0]
    assert capped.sum() == 2 and capped[:5].sum() == 2


def test_sms_counts_differ_per_frame():
    model = tiny_model("qwen2_5_vl")
    pan, still = make_frames(8, seed=0), make_frames(8, seed=0, static=True)
    inputs = make_inputs(model, videos=[pan, still])
    tokenreduce.patch(model, "sms", second_round=False)
    last_logits(model, inputs)
    first = tokenreduce.stats(model)
    assert 0 < first.visual_tokens_kept[0] < first.visual_tokens_in[0]
    assert first.visual_tokens_kept[0] != first.visual_tokens_kept[1]  # the count follows the content


# shortv -------------------------------------------------------------------------------------------
def _zeroed_update_reference(model, inputs, layers):
    """Dense forward where the given layers' updates to visual rows are undone (the definition)."""
    visual = inputs["input_ids"] == model.config.video_token_id
    handles = []
    for i in layers:
        layer = model.model.language_model.layers[i]

        def restore(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            out = torch.where(visual[..., None], hidden_in, out)
            return (out, *output[1:]) if isinstance(output, tuple) else out

        handles.append(layer.register_forward_hook(restore, with_kwargs=True))
    try:
        return last_logits(model, inputs)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_frozen_layers_equal_zeroing_the_visual_update_and_skip_the_work(family):
    model = tiny_model(family)
    inputs = video_inputs(model, n=2, text_lens=[3, 7])
    expected = _zeroed_update_reference(model, inputs, (1, 2))
    rows = {}
    tokenreduce.patch(model, "shortv", layers=(1, 2))
    for i, layer in enumerate(model.model.language_model.layers):  # after the patch's own hooks
        layer.mlp.register_forward_pre_hook(lambda m, a, i=i: rows.__setitem__(i, a[0].shape[1]))
    got = last_logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    length, visual = inputs["input_ids"].shape[1], int((inputs["input_ids"] == model.config.video_token_id)
                                                       .sum(dim=1).min())
    assert rows[0] == rows[3] == length and rows[1] == rows[2] <= length - visual  # frozen rows not computed
    with torch.no_grad():  # and generation works after a frozen prefill
        assert model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == length + 3


def test_shortv_calibration_profile_round_trip(tmp_path):
    model = tiny_model("qwen2_5_vl")
    samples = [video_inputs(model), make_inputs(model, videos=[make_frames(8, seed=5)])]
    profile = tokenreduce.calibrate(model, "shortv", samples, progress=False)
    assert profile["method"] == "shortv" and profile["num_layers"] == 4 and profile["samples"] == 2
    assert profile["architecture"] == "Qwen2_5_VLForConditionalGeneration"
    lc = profile["layer_contribution"]
    assert len(lc) == 4 and all(v >= 0 for v in lc) and max(lc) > 0
    path = tokenreduce.save_profile(profile, tmp_path / "p.json")
    assert json.loads(path.read_text()) == profile
    tokenreduce.patch(model, "shortv", profile=str(path), frozen_fraction=0.5)
    frozen = sorted(range(4), key=lambda i: (lc[i], i))[:2]
    assert sorted(model._tokenreduce_engine.engines["hf"].frozen.layers) == sorted(frozen)
    inputs = samples[0]
    tokenreduce.unpatch(model)
    dense = last_logits(model, inputs)
    tokenreduce.patch(model, "shortv", profile=profile, frozen_fraction=0.0)  # nothing frozen: the identity
    assert torch.equal(last_logits(model, inputs), dense)


def test_shortv_errors():
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="needs a calibration profile"):
        tokenreduce.patch(model, "shortv")
    profile = {"method": "shortv", "architecture": "Qwen2VLForConditionalGeneration", "num_layers": 28,
               "layer_contribution": [0.0] * 28}
    with pytest.raises(ValueError, match="28-layer"):
        tokenreduce.patch(model, "shortv", profile=profile)
    with pytest.raises(ValueError, match="calibrated on LlavaOnevision"):
        tokenreduce.patch(model, "shortv", profile=dict(profile, num_layers=4, layer_contribution=[0.0] * 4,
                                                        architecture="LlavaOnevisionForConditionalGeneration"))
    with pytest.raises(ValueError, match="does not exist"):
        tokenreduce.patch(model, "shortv", profile="/nonexistent/profile.json")
    with pytest.raises(ValueError, match="frozen_fraction"):
        tokenreduce.patch(model, "shortv", layers=(1,), frozen_fraction=2)
    with pytest.raises(ValueError, match="needs no calibration; calibrated methods: .*shortv"):
        tokenreduce.calibrate(model, "fastv", [])


# composition --------------------------------------------------------------------------------------
def test_composition_runs_each_stage_and_reports_it():
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model)
    tokenreduce.patch(model, ["aim", "shortv", "fastv"], retention=0.25, layers=(1,), prune=False)
    engine = model._tokenreduce_engine.engines["hf"]
    assert [m.name for m in engine.methods] == ["aim", "shortv", "fastv"]
    assert engine.methods[0].retention == engine.methods[2].retention == 0.25
    last_logits(model, inputs)
    s = tokenreduce.stats(model)
    assert s.method == "aim+shortv+fastv"
    assert set(s.stages) == {"aim"} and s.stages["aim"]["rows_before_after_layer"][0][1] < s.sequence_length
    assert s.visual_tokens_kept[0] == math.ceil(0.25 * s.visual_tokens_in[0])


@dataclass
class OtherFreeze(VisualMethod):
    name: ClassVar[str] = "other-freeze"
    stages: ClassVar[tuple[str, ...]] = ("freeze",)

    def act_layers(self, num_layers):
        return set()


def test_conflicting_compositions_say_why():
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="shortv and other-freeze cannot be composed: they both decide which "
                                         "layers leave visual tokens frozen"):
        tokenreduce.patch(model, [ShortV(layers=(1,)), OtherFreeze()])
    with pytest.raises(ValueError, match="appears twice"):
        tokenreduce.patch(model, ["fastv", "fastv"])
    with pytest.raises(TypeError, match=r"option\(s\) \['bogus'\]"):
        tokenreduce.patch(model, ["fastv", "evs"], bogus=1)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize("name, options, reduces", [
    ("aim", {"retention": 0.5, "prune": False}, True), ("sms", {"second_round": False}, None),
    ("evs", {"retention": 0.3}, False), ("pyramiddrop", {}, True), ("shortv", {"layers": (1,)}, False)])
def test_images_and_text_only_prompts(family, name, options, reduces):
    model = tiny_model(family)
    text = make_inputs(model, text_lens=[6])
    dense_text = last_logits(model, text)
    image = make_inputs(model, images=[make_frames(1)[0]])
    dense_image = last_logits(model, image)
    tokenreduce.patch(model, name, **options)
    got = last_logits(model, image)
    s = tokenreduce.stats(model)
    if reduces:
        assert s.visual_tokens_kept[0] < s.visual_tokens_in[0]
    elif reduces is False:  # evs only acts on videos; shortv keeps every token
        assert s.visual_tokens_kept[0] == s.visual_tokens_in[0]
        if name == "evs":
            assert torch.equal(got, dense_image)
    assert torch.equal(last_logits(model, text), dense_text)


@dataclass
class DropFirstVisual(VisualMethod):
    """Test method: before ``layer``, drop each sample's first visual row."""

    name: ClassVar[str] = "drop-first-visual"
    layer: int = 2

    def act_layers(self, num_layers):
        return {self.layer}

    def reduce(self, step: Step):
        first = step.visual & (step.visual.long().cumsum(dim=1) == 1)
        return Selection.keep(step.valid & ~first)


def test_two_methods_reducing_before_the_same_layer_share_its_scores():
    """The second method reducing before layer 2 ranks the rows the first one kept by layer 1's scores."""
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model, n=2, text_lens=[3, 6])
    tokenreduce.patch(model, "fastv", retention=0.25)
    last_logits(model, inputs)
    alone = tokenreduce.stats(model).kept_indices
    tokenreduce.patch(model, [DropFirstVisual(), FastV(retention=0.25)])
    last_logits(model, inputs)
    s = tokenreduce.stats(model)
    assert s.stages["drop-first-visual"]["rows_before_after_layer"][2][1] == s.stages["fastv"][
        "rows_before_after_layer"][2][0]
    assert s.visual_tokens_kept == [math.ceil(0.25 * n) for n in s.visual_tokens_in]
    for b in range(2):  # the same ranking as fastv alone, minus the dropped row
        first = min(i for i in s.kept_indices[b][0] if s.layout.kind[b, i] > TEXT)
        assert set(s.kept_indices[b][-1]) <= set(alone[b][-1]) | set(s.kept_indices[b][0]) - {first}


@dataclass
class WatchTower(VisualMethod, register=False):
    """Test method: hooks the model only through ``setup(ctx)`` (a tower wrapper, a prefill callback) and
    reports through ``Selection.notes``."""

    name: ClassVar[str] = "watch-tower"

    def act_layers(self, num_layers):
        return {0}

    def setup(self, ctx):
        self.seen = []
        tower = ctx.tower()

        def forward(original, *args, **kwargs):
            self.seen.append("tower")
            return original(*args, **kwargs)

        ctx.wrap(tower.module, "forward", forward)
        ctx.on_prefill(lambda prefill: prefill.memo(self.name).update(items=len(prefill.layout.grids[0])))

    def reduce(self, step: Step):
        self.seen.append(("prefill", step.memo["items"]))
        return Selection(step.row_index(), notes={"items": step.memo["items"]})


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_a_method_hooks_the_model_only_through_its_context_and_unpatch_undoes_it(family):
    """setup(ctx): ctx.tower() is the family's tower (from its adapter), ctx.wrap and ctx.on_prefill hooks are
    removed by unpatch, and a Selection's notes land in Stats.stages."""
    model = tiny_model(family)
    inputs = make_inputs(model, images=[make_frames(1)[0]])
    dense = last_logits(model, inputs)
    method = WatchTower()
    tokenreduce.patch(model, method)
    assert torch.equal(last_logits(model, inputs), dense)  # the Selection keeps every row
    assert method.seen == ["tower", ("prefill", 1)]
    assert tokenreduce.stats(model).stages["watch-tower"] == {"items": 1}
    tokenreduce.unpatch(model)
    tower = model.model.visual if family == "qwen2_vl" else model.model.vision_tower
    assert "forward" not in tower.__dict__
    last_logits(model, inputs)
    assert method.seen == ["tower", ("prefill", 1)]
