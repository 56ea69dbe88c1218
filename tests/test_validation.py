"""Bad input to methods, profiles and calibration is refused with the option, field, file or sample named
(issue 14, items 5 and 6), and the official-rounding options give the official codes' counts."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import video_inputs
from transformers import LlamaConfig, LlamaForCausalLM

import tokenreduce
from tokenreduce.methods import REGISTRY, make_method
from tokenreduce.methods.aim import aim_frame_count, aim_groups
from tokenreduce.methods.base import budget
from tokenreduce.methods.options import Flag, Layer, Layers, Number, Text, checks
from tokenreduce.testing import make_inputs, tiny_model

LLM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=1024)
INTERLAYER = {"method": "interlayer", "architecture": "LlamaForCausalLM", "num_layers": 4, "groups": [[0, 1], [2, 3]]}
SHORTV = {"method": "shortv", "architecture": "Qwen2VLForConditionalGeneration", "num_layers": 4,
          "layer_contribution": [0.1, 0.2, 0.3, 0.4]}
REQUIRED = {"interlayer": {"profile": INTERLAYER}}  # options a method cannot be built without
UNDECLARED = {"profile", "store"}  # objects checked by the method itself (schema, type), not by a declaration


def tiny_llm():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**LLM, attn_implementation="sdpa")).eval()


# options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_option_is_declared_with_a_check(name):
    """Each method states each option's type and range once, on its field: a new option without one fails."""
    declared = {option for option, _ in checks(REGISTRY[name])}
    undeclared = [f.name for f in dataclasses.fields(REGISTRY[name]) if f.name not in declared | UNDECLARED]
    assert not undeclared, f"{name}: options {undeclared} have no declared check (tokenreduce.methods.options)"


def _bad_values(check) -> list:
    return [v for v in _candidates(check) if not (v is None and check.none)]  # None is fine where declared so


def _candidates(check) -> list:
    if isinstance(check, Number):
        return [float("nan"), float("inf"), -float("inf"), "0.5", True]
    if isinstance(check, Flag):
        return ["no", "false", 0, 1, -1, None]
    if isinstance(check, Layers):
        return [(), [1, 1], [1.0], "12", [-1]]
    if isinstance(check, Text):
        return ["", 3, None]
    return [float("nan"), 1.5, True, "2"]  # an integer / layer / choice / text: none of these


CASES = [(name, option, bad) for name in sorted(REGISTRY) for option, check in checks(REGISTRY[name])
         for bad in _bad_values(check)]


@pytest.mark.parametrize("name, option, bad", CASES, ids=[f"{n}-{o}-{b!r}" for n, o, b in CASES])
def test_every_declared_option_refuses_bad_values_by_name(name, option, bad):
    """NaN passed the old ``x < 0`` checks; ``"no"`` read as True; -1 as a bool; () and duplicate layers did nothing."""
    with pytest.raises(ValueError, match=rf"^{name}: .*{option}"):
        make_method(name, **{**REQUIRED.get(name, {}), option: bad})


@pytest.mark.parametrize("name, options", [
    ("semshare", {"position_scale": float("nan")}), ("sms", {"slope": float("nan")}),
    ("static", {"threshold": float("nan")}), ("semtoken", {"density_weight": float("nan")}),
    ("aim", {"prune": "no"}), ("semshare", {"save": "no"}), ("sms", {"second_round": -1}),
    ("shortv", {"layers": ()}), ("shortv", {"layers": (1, 2, 1)}), ("pyramiddrop", {"layers": (2, 2)}),
    ("fastv", {"retention": float("nan")}), ("visionzip", {"dominant_fraction": float("nan")}),
    ("framefusion", {"similarity_threshold": float("nan")}), ("framefusion", {"ratio_lower_bound": float("nan")}),
])
def test_the_issue_cases_are_refused_by_patch(name, options):
    model = tiny_llm() if REGISTRY[name].engine == "kv" else tiny_model("qwen2_vl")
    option = next(iter(options))
    with pytest.raises(ValueError, match=rf"{name}: .*{option} must be"):
        tokenreduce.patch(model, name, **options)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize("name, options, message", [
    ("semshare", {"check_layer": 100}, "check_layer=100 but the model has 4 LLM layers; choose 0 <= check_layer <= 2"),
    ("semshare", {"check_layer": 3}, "check_layer=3 but the model has 4 LLM layers"),  # no later layer reuses KV
])
def test_layer_options_must_fit_the_kv_models_depth(name, options, message):
    model = tiny_llm()
    with pytest.raises(ValueError, match=message):
        tokenreduce.patch(model, name, **options)
    assert not tokenreduce.is_patched(model)


@pytest.mark.parametrize("name, options, message", [
    ("shortv", {"layers": (1, 4)}, r"shortv: layers \[4\] do not exist; the model has 4 LLM layers"),
    ("pyramiddrop", {"layers": (1, 9)}, r"pyramiddrop: layers \[9\] do not exist"),
    ("fastv", {"layer": 4}, "fastv: layer=4 but the model has 4 LLM layers"),
    ("aim", {"prune_start": 9, "prune_end": 9}, "aim: prune_start=9 but the model has 4 LLM layers"),
])
def test_layer_options_must_fit_the_visual_models_depth(name, options, message):
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match=message):
        tokenreduce.patch(model, name, **options)
    assert not tokenreduce.is_patched(model)


def test_valid_options_are_kept_and_layer_lists_normalised():
    assert make_method("shortv", layers=[2, 0]).layers == (2, 0)
    assert make_method("aim", prune=False).prune is False
    assert make_method("visionzip", layer=-2).layer == -2  # a Python index into the tower
    assert make_method("semshare", check_layer=0, position_scale=1).position_scale == 1


# official rounding --------------------------------------------------------------------------------
def test_budget_roundings_match_the_official_formulas():
    n = torch.tensor([5, 7, 576, 10, 9])
    assert budget(0.5, n).tolist() == [3, 4, 288, 5, 5]  # ceil
    assert budget(0.5, n, "nearest").tolist() == [round(x * (1 - 0.5)) for x in n.tolist()] == [2, 4, 288, 5, 4]
    assert budget(0.3, n, "floor").tolist() == [int(x * 0.3) for x in n.tolist()] == [1, 2, 172, 3, 2]


@pytest.mark.parametrize("name, official", [
    ("fastv", lambda n, r: round(n * (1 - (1 - r)))),  # FastV: topk(round(N * (1 - R))), R = 1 - retention
    ("pyramiddrop", lambda n, r: int(n * r)),  # PyramidDrop: int(N * ratio) after the first stage
])
def test_official_rounding_gives_the_official_count(name, official):
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model)
    tokenreduce.patch(model, name, retention=1.0)
    with torch.no_grad():
        model(**inputs)
    n = tokenreduce.stats(model).visual_tokens_in[0]
    retention = (n // 3 + 0.3) / n  # N * retention = k + 0.3: ceil keeps k + 1, the official codes keep k
    layers = {"layers": (2,)} if name == "pyramiddrop" else {}
    kept = {}
    for rounding in ("ceil", "official"):
        tokenreduce.patch(model, name, retention=retention, rounding=rounding, **layers)
        with torch.no_grad():
            model(**inputs)
        kept[rounding] = tokenreduce.stats(model).visual_tokens_kept[0]
    assert kept["official"] == official(n, retention) == n // 3
    assert kept["ceil"] == math.ceil(n * retention) == n // 3 + 1


def _official_aim(n: int, rounds: int = 2) -> int:
    """AIM's official merging count: round k merges ``N // 2**k``, at most half the tokens left (rounded down)."""
    left = n
    for k in range(1, rounds + 1):
        left -= min(n // 2 ** k, left // 2)
    return left


@pytest.mark.parametrize("cells", [7, 9, 11, 13, 16, 576])
def test_aim_official_rounding_gives_the_official_count(cells):
    gen = torch.Generator().manual_seed(cells)
    feats = torch.randn(3, cells, 8, generator=gen)
    present = torch.ones(3, cells, dtype=torch.bool)
    size = torch.ones(3, cells)
    for official, expected in ((True, _official_aim(cells)), (False, aim_frame_count(cells, 0.25, 2))):
        rep = aim_groups(feats, present, size, 0.25, rounds=2, official=official)
        assert [len(set(r.tolist())) for r in rep] == [expected] * 3
        assert aim_frame_count(cells, 0.25, 2, official=official) == expected
    if cells in (7, 11):  # odd frames: the default merges one token more (documented in docs/methods.md)
        assert aim_frame_count(cells, 0.25, 2) == _official_aim(cells) - 1


def test_aim_official_rounding_in_the_model():
    """A 6 x 10 patch image is 15 tokens: two official rounds keep 15 - 7 - 3 = 5, ours 15 - 7 - 4 = 4."""
    model = tiny_model("qwen2_vl")
    image = np.random.default_rng(0).integers(0, 256, (84, 140, 3), dtype=np.uint8)
    inputs = make_inputs(model, images=[image])
    assert int(inputs["image_grid_thw"][0].prod()) // 4 == 15
    kept = {}
    for rounding in ("ceil", "official"):
        tokenreduce.patch(model, "aim", rounds=2, prune=False, rounding=rounding)
        with torch.no_grad():
            model(**inputs)
        kept[rounding] = tokenreduce.stats(model).visual_tokens_kept[0]
    assert kept == {"official": _official_aim(15), "ceil": aim_frame_count(15, 0.25, 2)} == {"official": 5, "ceil": 4}


# profiles -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("contribution, problem", [
    ([0.1, float("nan"), 0.3, 0.4], "finite numbers"), ([0.1, "x", 0.3, 0.4], "finite numbers"),
    ([0.1, True, 0.3, 0.4], "finite numbers"), ("0.1,0.2", "finite numbers"), ([0.1, 0.2], "one number per layer"),
])
def test_shortv_profile_values_are_checked_on_load(tmp_path, contribution, problem):
    path = tmp_path / "shortv.json"
    path.write_text(json.dumps({**SHORTV, "layer_contribution": contribution}))  # NaN is written as NaN
    with pytest.raises(ValueError, match=rf"profile {re.escape(str(path))}: 'layer_contribution' must .*{problem}"):
        tokenreduce.patch(tiny_model("qwen2_vl"), "shortv", profile=str(path))
    with pytest.raises(ValueError, match=rf"the profile dict: 'layer_contribution' must .*{problem}"):
        make_method("shortv", profile={**SHORTV, "layer_contribution": contribution})


def test_profile_layer_count_must_match_the_model_and_names_the_file(tmp_path):
    path = tokenreduce.save_profile({**SHORTV, "num_layers": 3, "layer_contribution": [0.1, 0.2, 0.3]},
                                    tmp_path / "three.json")
    where = re.escape(str(path))
    with pytest.raises(ValueError, match=rf"shortv: profile {where} was calibrated on a 3-layer .* this model has 4"):
        tokenreduce.patch(tiny_model("qwen2_vl"), "shortv", profile=path)
    for bad in (0, "4", 4.0, None):
        with pytest.raises(ValueError, match="'num_layers' must be a positive integer"):
            make_method("shortv", profile={**SHORTV, "num_layers": bad})


@pytest.mark.parametrize("groups, problem", [
    ([[0, 1], [2, 3, 4]], "within the 4 layers"), ([[0, 2], [1, 3]], "adjacent layers"),
    ([[1, 0]], "adjacent layers"), ("0,1", "non-empty list of lists"), ([0, 1], "non-empty lists"),
    ([[0, 1], [1, 2]], "disjoint"), ([[2, 3], [0, 1]], "in order"), ([[]], "non-empty lists"), ([], "non-empty list"),
    ([[-1, 0]], "within the 4 layers"), ([[0.0, 1.0]], "integers"),
])
def test_interlayer_groups_are_checked_on_load(tmp_path, groups, problem):
    path = tokenreduce.save_profile({**INTERLAYER, "groups": groups}, tmp_path / "groups.json")
    with pytest.raises(ValueError, match=rf"profile {re.escape(str(path))}: 'groups' must .*{problem}"):
        tokenreduce.patch(tiny_llm(), "interlayer", profile=path)


def test_interlayer_profile_for_another_depth_names_the_file(tmp_path):
    path = tokenreduce.save_profile({**INTERLAYER, "num_layers": 2, "groups": [[0, 1]]}, tmp_path / "two.json")
    with pytest.raises(ValueError, match=rf"interlayer: profile {re.escape(str(path))} was calibrated on a 2-layer"):
        tokenreduce.patch(tiny_llm(), "interlayer", profile=path)


def test_load_profile_refuses_what_is_not_a_profile_file(tmp_path):
    with pytest.raises(TypeError, match="a profile must be a dict or the path of a JSON file .* got int"):
        tokenreduce.load_profile(3)
    with pytest.raises(TypeError, match="got list"):
        tokenreduce.load_profile([SHORTV])
    with pytest.raises(ValueError, match="is not a file"):
        tokenreduce.load_profile(tmp_path)
    binary = tmp_path / "profile.bin"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(ValueError, match=rf"profile {re.escape(str(binary))} is not a text file"):
        tokenreduce.load_profile(binary)
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(ValueError, match="a JSON list, not an object"):
        tokenreduce.load_profile(array)
    with pytest.raises(ValueError, match="is for method 'interlayer', not shortv"):
        make_method("shortv", profile=INTERLAYER)


# calibration samples --------------------------------------------------------------------------------
def test_calibration_refuses_nan_inputs_and_non_dict_samples():
    model = tiny_model("qwen2_vl")
    sample = video_inputs(model)
    nan = dict(sample, pixel_values_videos=torch.full_like(sample["pixel_values_videos"], float("nan")))
    with pytest.raises(ValueError, match="shortv calibration sample 1: 'pixel_values_videos' holds NaN or inf"):
        tokenreduce.calibrate(model, "shortv", [sample, nan], progress=False)
    for bad, what in ((["input_ids"], "sample 0 must be a non-empty dict"), ([{}], "sample 0 must be a non-empty"),
                      (sample, "takes a list of samples"), ([], "at least one sample")):
        with pytest.raises(ValueError, match=what) as err:
            tokenreduce.calibrate(model, "shortv", bad, progress=False)
        assert len(str(err.value)) < 300  # not the model's printout
    llm = tiny_llm()
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="interlayer calibration sample 0: 'inputs_embeds' holds NaN"):
        tokenreduce.calibrate(llm, "interlayer", [{"inputs_embeds": torch.full((1, 8, 64), float("nan"))}])
    with pytest.raises(ValueError, match="interlayer calibration sample 1 must be a non-empty dict"):
        tokenreduce.calibrate(llm, "interlayer", [{"input_ids": ids}, ids])


def test_calibration_refuses_a_model_whose_outputs_are_not_finite():
    """An all-NaN profile used to come back (and then froze arbitrary layers)."""
    model = tiny_model("qwen2_vl")
    sample = video_inputs(model)
    with torch.no_grad():
        model.lm_head.weight[0] = float("nan")
    with pytest.raises(ValueError, match="shortv calibration sample 0: the model's next-token log-probabilities are "
                                         "NaN or inf"):
        tokenreduce.calibrate(model, "shortv", [sample], progress=False)
    llm = tiny_llm()
    with torch.no_grad():
        llm.model.layers[1].self_attn.q_proj.weight.fill_(float("nan"))
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="interlayer calibration sample 0: the model's attention probabilities in "
                                         "layer 1 are NaN"):
        tokenreduce.calibrate(llm, "interlayer", [{"input_ids": ids}])


def test_layer_checks_have_the_depth_rule_they_state():
    assert Layer(minimum=1).describe() == "an LLM layer index (integer) >= 1"
    Layer(room=1).fit("m", "x", 2, 4)
    with pytest.raises(ValueError, match="choose 0 <= x <= 2"):
        Layer(room=1).fit("m", "x", 3, 4)
