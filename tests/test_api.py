"""patch / unpatch / stats / methods: the public API and its errors."""

from __future__ import annotations

import pytest
import torch
from conftest import last_logits, video_inputs
from transformers import Qwen2Config, Qwen2ForCausalLM

import tokenreduce
from tokenreduce.testing import make_inputs, tiny_model


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_methods_listed_with_descriptions():
    listed = tokenreduce.methods()
    assert {"framefusion", "fastv"} <= set(listed)
    assert all(isinstance(d, str) and d for d in listed.values())


def test_patch_returns_model_and_method_object_works():
    model = tiny_model("qwen2_vl")
    assert tokenreduce.patch(model, tokenreduce.FrameFusion(retention=0.5)) is model
    assert tokenreduce.is_patched(model)
    model(**video_inputs(model))
    assert tokenreduce.stats(model).method == "framefusion"


@pytest.mark.parametrize("options, error", [
    ({"retention": 0.0}, ValueError), ({"retention": 1.5}, ValueError), ({"retention": -0.1}, ValueError),
    ({"retention": "0.3"}, ValueError), ({"retention": 0.3, "cost": 0.3}, ValueError),
    ({"similarity_threshold": 2.0}, ValueError), ({"ratio_lower_bound": -1}, ValueError),
    ({"similarity_threshold": 0.6, "similarity_lower_bound": 0.8}, ValueError),
    ({"merge_layers": 0}, ValueError), ({"merge_layers": 4}, ValueError), ({"bogus": 1}, TypeError),
])
def test_bad_framefusion_options(options, error):
    model = tiny_model("qwen2_vl")
    with pytest.raises(error):
        tokenreduce.patch(model, "framefusion", **options)
    assert not tokenreduce.is_patched(model)


def test_bad_fastv_layer_names_the_depth():
    with pytest.raises(ValueError, match="4 LLM layers"):
        tokenreduce.patch(tiny_model("llava_onevision"), "fastv", layer=4)


def test_unknown_method_lists_alternatives():
    with pytest.raises(ValueError, match="framefusion"):
        tokenreduce.patch(tiny_model("qwen2_vl"), "nope")


def test_unsupported_model_names_supported_classes():
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(TypeError, match="Qwen2VLForConditionalGeneration"):
        tokenreduce.patch(Qwen2ForCausalLM(cfg), "framefusion")


def test_stats_errors():
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match="not patched"):
        tokenreduce.stats(model)
    tokenreduce.patch(model, "fastv")
    with pytest.raises(RuntimeError, match="no forward"):
        tokenreduce.stats(model)


def test_unpatch_restores_exact_behaviour_and_removes_everything(family):
    model = tiny_model(family)
    inputs = video_inputs(model)
    dense = last_logits(model, inputs)
    attn = model.config.get_text_config()._attn_implementation
    before = hook_count(model)
    tokenreduce.patch(model, "framefusion", retention=0.3)
    assert not torch.equal(last_logits(model, inputs), dense)
    tokenreduce.unpatch(model)
    assert torch.equal(last_logits(model, inputs), dense)
    assert model.config.get_text_config()._attn_implementation == attn
    assert hook_count(model) == before
    assert not any(hasattr(m, "_tokenreduce_engine") for m in model.modules())
    assert "get_video_features" not in vars(model.model)
    with pytest.raises(ValueError):
        tokenreduce.unpatch(model)


@pytest.mark.parametrize("method", ["framefusion", "snapkv"])
def test_a_patched_model_refuses_deepcopy_and_pickle_and_copies_again_once_unpatched(method):
    """A deep copy of a patched model would keep hooks acting on the original: it is refused with a message
    saying what to do (not an obscure lock-pickling error), and works again after unpatch."""
    import copy
    import pickle

    model = tiny_model("llava_next_video")
    tokenreduce.patch(model, method, retention=0.5)
    with pytest.raises(TypeError, match="tokenreduce.unpatch"):
        copy.deepcopy(model)
    with pytest.raises(TypeError, match="tokenreduce.unpatch"):
        pickle.dumps(model)
    tokenreduce.unpatch(model)
    inputs = video_inputs(model)
    assert torch.equal(last_logits(copy.deepcopy(model), inputs), last_logits(model, inputs))
    assert "__deepcopy__" not in vars(model) and "__reduce_ex__" not in vars(model)


def test_patching_twice_replaces_the_patch():
    model = tiny_model("llava_next_video")
    inputs = video_inputs(model)
    last_logits(model, inputs)  # transformers adds its own output-recording hooks on first use
    before = hook_count(model)
    tokenreduce.patch(model, "fastv", retention=0.5)
    tokenreduce.patch(model, "fastv", retention=0.25)
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    assert s.visual_tokens_kept == [32]  # 25% of 128, applied once
    assert hook_count(model) == before + 3 + model.config.text_config.num_hidden_layers


def test_stats_content():
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model, frames=8)
    tokenreduce.patch(model, "fastv", retention=0.5, layer=2)
    with torch.no_grad():
        model(**inputs)
    s = tokenreduce.stats(model)
    length = inputs["input_ids"].shape[1]
    assert s.sequence_length == length
    assert s.layer_tokens[:2] == [length, length] and s.layer_tokens[2] == length - 8
    assert s.visual_tokens_in == [16] and s.visual_tokens_kept == [8]
    assert s.kept_indices[0][0] == list(range(length))
    assert len(s.kept_indices[0][3]) == length - 8
    assert s.reduce_ms >= 0
    grid = s.kept_grid(0, 0)
    assert grid.shape == (4, 2, 2) and grid.sum() == 8


def test_labels_and_static_cache_are_refused_clearly():
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model)
    tokenreduce.patch(model, "fastv")
    with pytest.raises(ValueError, match="labels"):
        model(**inputs, labels=inputs["input_ids"])
    with pytest.raises(ValueError, match="DynamicCache"), torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_direct_encoder_calls_leave_no_stale_inputs():
    model = tiny_model("qwen2_vl")
    video = video_inputs(model)
    tokenreduce.patch(model, "framefusion")
    with torch.no_grad():
        model.model.get_video_features(video["pixel_values_videos"], video["video_grid_thw"])
        model(**make_inputs(model, text_lens=[6]))  # text-only: must not see the video's grid
    assert tokenreduce.stats(model).visual_tokens_in == [0]


@pytest.mark.parametrize("order", [["streamingllm", "fastv"], ["fastv", "streamingllm"]])
def test_cache_and_visual_methods_are_refused_in_either_order(order):
    model = tiny_model("qwen2_vl")
    with pytest.raises(ValueError, match=r"cache methods \['streamingllm'\] cannot be composed with visual-token "
                                         r"methods \['fastv'\] yet"):
        tokenreduce.patch(model, order)
    assert not tokenreduce.is_patched(model) and hook_count(model) == 0
