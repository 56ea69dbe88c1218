"""``tokenreduce.patch(model)`` without a method: the measured default per model kind, logged, overridable."""

from __future__ import annotations

import logging

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

import tokenreduce
from tokenreduce.defaults import VISUAL
from tokenreduce.methods import REGISTRY
from tokenreduce.testing import make_frames, make_inputs, tiny_model


def test_video_llm_gets_the_measured_default_and_a_log_line(caplog):
    model = tiny_model("qwen2_vl")
    with caplog.at_level(logging.INFO, logger="tokenreduce"):
        assert tokenreduce.patch(model) is model
    lines = [r.getMessage() for r in caplog.records if r.name == "tokenreduce"]
    assert len(lines) == 1 and VISUAL.method in lines[0] and "organism" in lines[0]
    model(**make_inputs(model, videos=[make_frames(8)]))
    stats = tokenreduce.stats(model)
    assert stats.method == VISUAL.method
    kept, seen = stats.visual_tokens_kept[0], stats.visual_tokens_in[0]
    assert kept < seen  # it reduced, at the default retention
    assert abs(kept / seen - VISUAL.options["retention"]) < 0.1


def test_options_override_the_default_settings():
    model = tiny_model("llava_onevision")
    tokenreduce.patch(model, retention=0.5)
    model(**make_inputs(model, videos=[make_frames(8)]))
    stats = tokenreduce.stats(model)
    assert stats.method == VISUAL.method
    assert abs(stats.visual_tokens_kept[0] / stats.visual_tokens_in[0] - 0.5) < 0.1


def test_text_only_llm_gets_a_clear_error_listing_the_kv_methods():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError) as err:
        tokenreduce.patch(LlamaForCausalLM(config))
    kv = [n for n, c in REGISTRY.items() if c.engine == "kv"]
    assert kv and all(n in str(err.value) for n in kv)
    assert "text-only" in str(err.value)


def test_methods_names_the_default_and_its_measurement():
    listed = tokenreduce.methods()
    assert "default of tokenreduce.patch(model)" in listed[VISUAL.method]
    assert "docs/organism.md" in listed[VISUAL.method]
    assert sum("default of" in d for d in listed.values()) == 1
