"""The semantics every method shares: identity, original positions, batch == singles, backends,
dtypes, real reduction of compute and cache, generation, accelerate loading. The per-method contract
(identity, batch == singles, real reduction) runs over every tiny model (``model_name``: the families plus
LLaVA-NeXT-Video with a DINOv2 tower, the organism's architecture)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import last_logits, sample_of, video_inputs
from method_matrix import MATRIX, contract, options_for

import tokenreduce
from tokenreduce.methods import REGISTRY, Selection, Step, VisualMethod
from tokenreduce.testing import make_frames, make_inputs, tiny_model

METHODS = sorted(REGISTRY)  # every registered method; tests/method_matrix.py says how each one runs


@dataclass
class DropRows(VisualMethod):
    """Test method: drop the given original rows before ``layer``."""

    name: ClassVar[str] = "drop-rows"
    layer: int = 0
    drop: tuple[int, ...] = ()

    def act_layers(self, num_layers):
        return {self.layer}

    def reduce(self, step: Step) -> Selection:
        return Selection.keep(step.valid & ~torch.isin(step.rows, torch.tensor(self.drop)))


@pytest.mark.parametrize("name", METHODS)
def test_retention_one_is_identity(model_name, name):
    options = options_for(name, "identity", model_name)
    model = tiny_model(model_name)
    inputs = video_inputs(model, n=2, text_lens=[5, 9])
    with torch.no_grad():
        dense = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        tokenreduce.patch(model, name, **(options(model) if callable(options) else options))
        out = model(**inputs).logits
        assert torch.allclose(out, dense, atol=1e-5, rtol=0)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), gen)


def test_framefusion_cost_one_is_identity():
    model = tiny_model("llava_onevision")
    inputs = video_inputs(model)
    dense = last_logits(model, inputs)
    tokenreduce.patch(model, "framefusion", cost=1.0)
    assert torch.allclose(last_logits(model, inputs), dense, atol=1e-5, rtol=0)


def _captured_position_ids(model, inputs):
    seen = {}
    lm = model.model.language_model

    def grab(module, args, kwargs):
        seen.setdefault("p", kwargs.get("position_ids"))

    h = lm.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    h.remove()
    return seen["p"]


def test_dropped_rows_keep_original_positions(family):
    """Removing tokens before layer 0 equals the dense model with those tokens masked out and
    every other token at its original position (1-D RoPE and Qwen's 3-D M-RoPE)."""
    model = tiny_model(family)
    inputs = video_inputs(model)
    visual = torch.nonzero(inputs["input_ids"][0] == model.config.video_token_id).flatten()
    drop = visual[torch.randperm(len(visual), generator=torch.Generator().manual_seed(1))[: len(visual) // 2]]
    holes = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    holes["attention_mask"][0, drop] = 0
    if family.startswith("qwen"):  # M-RoPE positions come from the mask: pin the unmasked ones
        holes["position_ids"] = _captured_position_ids(model, inputs)
    expected = last_logits(model, holes)
    tokenreduce.patch(model, DropRows(layer=0, drop=tuple(drop.tolist())))
    got = last_logits(model, inputs)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert tokenreduce.stats(model).layer_tokens == [inputs["input_ids"].shape[1] - len(drop)] * 4


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_generation_continues_from_original_positions(family):
    """Decoding after a reduced prompt equals dense greedy decoding (no cache, full recompute)
    with the removed tokens masked out and every token at its original position."""
    model = tiny_model(family)
    inputs = video_inputs(model)
    visual = torch.nonzero(inputs["input_ids"][0] == model.config.video_token_id).flatten()
    drop = visual[::3]
    steps = 5
    ids, mask = inputs["input_ids"], inputs["attention_mask"].clone()
    mask[0, drop] = 0
    expected = []
    with torch.no_grad():
        for _ in range(steps):
            positions = torch.arange(ids.shape[1])[None]
            logits = model(**dict(inputs, input_ids=ids, attention_mask=mask, position_ids=positions),
                           use_cache=False).logits[:, -1]
            expected.append(logits)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        tokenreduce.patch(model, DropRows(layer=0, drop=tuple(drop.tolist())))
        got = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, ids)
    assert torch.allclose(torch.cat(got.logits), torch.cat(expected), atol=1e-5, rtol=0)
    assert tokenreduce.stats(model).decode_steps == steps - 1


def test_qwen_decode_positions_match_dense(family):
    if not family.startswith("qwen"):
        pytest.skip("M-RoPE decode positions are Qwen-specific")
    model = tiny_model(family)
    inputs = video_inputs(model)

    def decode_positions():
        seen = []
        lm = model.model.language_model
        h = lm.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["position_ids"].clone()) if k["inputs_embeds"].shape[1] == 1 else None,
            with_kwargs=True)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, do_sample=False)
        h.remove()
        return seen

    dense = decode_positions()
    tokenreduce.patch(model, "framefusion", retention=0.3)
    reduced = decode_positions()
    assert len(dense) == len(reduced) == 3
    assert all(torch.equal(a, b) for a, b in zip(dense, reduced, strict=True))


@pytest.mark.parametrize("name", METHODS)
def test_batch_equals_singles(model_name, name):
    options = options_for(name, "reduce", model_name)
    model = tiny_model(model_name)
    videos = [make_frames(8, seed=3), make_frames(8, seed=4)]
    lens = [4, 11]
    tokenreduce.patch(model, name, **options)
    batch = make_inputs(model, videos=videos, text_lens=lens)
    got = last_logits(model, batch)
    kept = tokenreduce.stats(model).kept_indices
    pad = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    for b in range(2):
        single = sample_of(batch, b)
        assert torch.allclose(got[b], last_logits(model, single)[0], atol=1e-4, rtol=0)
        alone = tokenreduce.stats(model).kept_indices[0]
        assert [[i - pad[b] for i in layer] for layer in kept[b]] == alone


@pytest.mark.parametrize("name", METHODS)
def test_eager_and_sdpa_select_the_same_tokens(name):
    options = options_for(name, "reduce", "qwen2_5_vl")
    kept = []
    for impl in ("sdpa", "eager"):
        model = tiny_model("qwen2_5_vl", attn_implementation=impl)
        inputs = video_inputs(model, n=2, text_lens=[3, 8])
        tokenreduce.patch(model, name, **options)
        logits = last_logits(model, inputs)
        kept.append((tokenreduce.stats(model).kept_indices, logits))
    assert kept[0][0] == kept[1][0]
    assert torch.allclose(kept[0][1], kept[1][1], atol=1e-4)


def test_bf16_selection_matches_fp32_up_to_near_ties():
    sets = []
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model("llava_onevision", dtype=dtype)
        inputs = video_inputs(model)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        tokenreduce.patch(model, "fastv", retention=0.5)
        with torch.no_grad():
            model(**inputs)
        sets.append(set(tokenreduce.stats(model).kept_indices[0][-1]))
    assert len(sets[0] & sets[1]) / len(sets[0] | sets[1]) > 0.8


@pytest.mark.parametrize("name", METHODS)
def test_reduction_is_real_in_layers_and_cache(model_name, name):
    options = options_for(name, "reduce", model_name)
    model = tiny_model(model_name)
    inputs = video_inputs(model)
    tokenreduce.patch(model, name, **options)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    s = tokenreduce.stats(model)
    length = inputs["input_ids"].shape[1]
    assert s.layer_tokens[-1] < length
    assert s.visual_tokens_kept[0] <= -(-s.visual_tokens_in[0] * options["retention"] // 1)
    cache = out.past_key_values
    for i, rows in enumerate(s.layer_tokens):
        assert cache.layers[i].keys.shape[-2] == rows + 2  # the prompt's kept rows + 2 decoded tokens
    assert cache.get_seq_length() == length + 2  # logical length: the original prompt's


def test_device_map_auto_and_bf16_loading(tmp_path):
    tiny_model("qwen2_vl").save_pretrained(tmp_path)
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path, device_map="auto", dtype=torch.bfloat16)
    inputs = video_inputs(model)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    tokenreduce.patch(model, "framefusion", retention=0.3)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert tokenreduce.stats(model).layer_tokens[-1] < inputs["input_ids"].shape[1]


def test_images_and_text_only_prompts(family):
    model = tiny_model(family)
    tokenreduce.patch(model, "framefusion", retention=0.3)
    image = make_inputs(model, images=[make_frames(1)[0]])
    with torch.no_grad():
        model.generate(**image, max_new_tokens=2, do_sample=False)
    s = tokenreduce.stats(model)
    n = s.visual_tokens_in[0]
    assert s.layer_tokens[0] == image["input_ids"].shape[1]  # an image has no adjacent frame: no merging
    assert s.visual_tokens_kept[0] == -(-n * 3 // 10)  # pruned to the budget
    text = make_inputs(model, text_lens=[6])
    dense_free = last_logits(model, text)
    tokenreduce.unpatch(model)
    assert torch.allclose(dense_free, last_logits(model, text), atol=1e-6)


def test_accelerate_hooks_on_every_module_keep_working():
    from accelerate.hooks import attach_align_device_hook

    inputs = None
    results = []
    for hooked in (False, True):
        model = tiny_model("qwen2_5_vl")
        if hooked:
            attach_align_device_hook(model, execution_device=torch.device("cpu"))
            assert hasattr(model.model.language_model.layers[0].self_attn.q_proj, "_hf_hook")
        inputs = inputs or video_inputs(model)
        tokenreduce.patch(model, "framefusion", retention=0.3)
        with torch.no_grad():
            results.append((last_logits(model, inputs), model.generate(**inputs, max_new_tokens=3, do_sample=False)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_beams_and_multiple_sequences(family):
    """generate() copies each prompt for beams / num_return_sequences after encoding the video once:
    every copy gets the same selection as its original."""
    model = tiny_model(family)
    inputs = video_inputs(model)
    tokenreduce.patch(model, "framefusion", retention=0.3)
    with torch.no_grad():
        single = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        kept = tokenreduce.stats(model).kept_indices[0]
        beams = model.generate(**inputs, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    s = tokenreduce.stats(model)
    assert beams.shape[0] == 2 and beams.shape[1] <= single.shape[1]
    assert s.kept_indices == [kept, kept]


def test_generate_without_cache_runs_and_reduces_every_step():
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model)
    tokenreduce.patch(model, "fastv", retention=0.5)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=False)
    s = tokenreduce.stats(model)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert s.sequence_length == inputs["input_ids"].shape[1] + 2  # the last step's prompt, reduced again
    assert s.visual_tokens_kept == [8]


@pytest.mark.parametrize("name", ["framefusion", "fastv"])
def test_last_prompt_token_is_never_removed(name):
    model = tiny_model("llava_next_video")
    inputs = make_inputs(model, videos=[make_frames(8, static=True)], text_lens=[0])  # prompt ends in video
    tokenreduce.patch(model, name, retention=0.1)
    with torch.no_grad():
        model(**inputs)
    last = inputs["input_ids"].shape[1] - 1
    assert all(rows[-1] == last for rows in tokenreduce.stats(model).kept_indices[0])


def test_the_method_matrix_lists_exactly_the_registered_methods():
    """A registered method missing from tests/method_matrix.py fails every contract test (above); an entry
    for a method that no longer exists is an error too."""
    assert sorted(MATRIX) == METHODS
    with pytest.raises(pytest.fail.Exception, match="'nosuch' is registered but not in tests/method_matrix.py"):
        contract("nosuch")
