"""tome-vision: ToMe inside the CLIP / SigLIP towers of LLaVA-OneVision and LLaVA-NeXT-Video (DINOv2:
tests/test_tower_dinov2.py)."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import last_logits, sample_of

import tokenreduce
from tokenreduce.methods.framefusion import FrameFusion
from tokenreduce.methods.tome_vision import TomeVision
from tokenreduce.models.towers import ClipSiglipBlock
from tokenreduce.testing import make_frames, make_inputs
from tokenreduce.testing import tiny_model as _tiny_model
from tokenreduce.vision.tome import TowerPass, bipartite_dest, merge_tokens, tome_layer, unmerge

LLAVA = ["llava_onevision", "llava_next_video"]
_BUILT: list = []


@functools.cache
def tiny_model(family: str):
    """One model per family for the whole module (building them is the slow part); tests unpatch them."""
    _BUILT.append(_tiny_model(family))
    return _BUILT[-1]


@pytest.fixture(autouse=True)
def _unpatch_after():
    yield
    for model in _BUILT:
        if tokenreduce.is_patched(model):
            tokenreduce.unpatch(model)


@functools.cache
def clip(seed: int):
    return make_frames(4, seed=seed)


def inputs_for(model, n: int = 1) -> dict:
    return make_inputs(model, videos=[clip(i) for i in range(n)])


def test_identical_tokens_merge_first_and_sizes_add_up():
    torch.manual_seed(0)
    metric = torch.randn(2, 10, 8)
    metric[:, 4] = metric[:, 7]  # an A token (even) identical to a B token (odd)
    dest = bipartite_dest(metric, 1)
    assert dest[:, 4].tolist() == [7, 7]
    assert (dest == torch.arange(10)).sum(dim=1).tolist() == [9, 9]
    x, size = torch.randn(2, 10, 4), torch.ones(2, 10)
    source = torch.arange(10).expand(2, 10)
    for _ in range(3):
        dest = bipartite_dest(torch.randn(2, x.shape[1], 8), 2)
        x, size, new = merge_tokens(x, size, dest, x.shape[1] - 2)
        source = new.gather(1, source)
    assert x.shape[1] == 4 and size.sum(dim=1).tolist() == [10, 10]
    assert torch.equal(torch.bincount(source[0], minlength=4).float(), size[0])  # sizes count the patches
    assert unmerge(x, source).shape == (2, 10, 4)


def test_cls_token_is_never_merged():
    metric = torch.randn(1, 9, 8)
    metric[:, 0] = metric[:, 1]
    dest = bipartite_dest(metric, 4, protect_first=True)
    assert dest[0, 0] == 0 and (dest[0] == 0).sum() == 1


@pytest.mark.parametrize("family", LLAVA)
def test_proportional_attention_on_duplicates_is_exact(family):
    """Tokens in identical pairs: merging each pair into one token of size 2 and adding log 2 to its
    attention logits gives every token exactly the dense layer's output."""
    layer = tiny_model(family).model.vision_tower.encoder.layers[0]
    torch.manual_seed(1)
    x = torch.randn(2, 8, layer.self_attn.embed_dim).repeat_interleave(2, dim=1)  # tokens 2k, 2k+1 equal
    ctx = TowerPass(size=torch.ones(2, 16), source=torch.arange(16).expand(2, 16))
    masks = []
    hook = layer.self_attn.k_proj.register_forward_hook(lambda m, a, out: setattr(ctx, "keys", out))
    pre = layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: masks.append(kw["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        dense = layer(x, None)
        merged = tome_layer(ClipSiglipBlock(layer), ctx, 8, False, x, None)  # r = 8: all pairs merge
        again = tome_layer(ClipSiglipBlock(layer), ctx, 0, False, merged, None)
    hook.remove()
    pre.remove()
    assert merged.shape[1] == 8 and torch.equal(ctx.size, torch.full((2, 8), 2.0))
    assert torch.allclose(unmerge(merged, ctx.source), dense, atol=1e-5)
    assert masks[0] is None and torch.equal(masks[1], torch.zeros(2, 1, 1, 16))  # dense; then sizes 1
    assert torch.allclose(masks[2], torch.full((2, 1, 1, 8), 2.0).log())  # the bias is log(size)
    with torch.no_grad():
        assert torch.allclose(unmerge(again, ctx.source), layer(dense, None), atol=1e-5)


@pytest.mark.parametrize("family", LLAVA)
def test_r_zero_is_the_dense_model_and_merging_reports(family):
    model = tiny_model(family)
    inputs = inputs_for(model)
    dense = last_logits(model, inputs)
    tokenreduce.patch(model, "tome-vision", r=0)
    assert torch.equal(last_logits(model, inputs), dense)
    tokenreduce.patch(model, "tome-vision", retention=0.5)
    reduced = last_logits(model, inputs)
    assert reduced.shape == dense.shape and not torch.equal(reduced, dense)
    notes = tokenreduce.stats(model).stages["vision"]
    cls = int(family == "llava_next_video")
    assert notes["tokens_per_layer"] == [48 + cls, 32 + cls]  # 64 patches, r = 16 per layer
    assert notes["patches_in"] == 4 * (64 + cls) and notes["patches_encoded"] == 4 * (40 + cls)


def test_batch_equals_singles_generate_and_composition():
    model = tiny_model("llava_onevision")
    inputs = inputs_for(model, n=2)
    tokenreduce.patch(model, "tome-vision")
    batch = last_logits(model, inputs)
    for b in range(2):
        assert torch.allclose(last_logits(model, sample_of(inputs, b)), batch[b:b + 1], atol=1e-5)
    tokenreduce.patch(model, [TomeVision(), FrameFusion(retention=0.25)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    s = tokenreduce.stats(model)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert s.visual_tokens_kept == [-(-65 // 4)] * 2 and s.stages["vision"]["patches_in"] == 8 * 64


def test_unpatch_restores_and_errors():
    model = tiny_model("llava_next_video")
    inputs = inputs_for(model)
    dense = last_logits(model, inputs)
    tokenreduce.patch(model, "tome-vision", r=8)
    tokenreduce.unpatch(model)
    tower = model.model.vision_tower
    assert "forward" not in tower.__dict__ and "forward" not in tower.encoder.layers[0].__dict__
    assert torch.equal(last_logits(model, inputs), dense)
    with pytest.raises(ValueError, match="static"):
        tokenreduce.patch(tiny_model("qwen2_vl"), "tome-vision")
    for bad in ({"r": -1}, {"retention": 0}, {"r": 2, "retention": 0.5}, {"r": 1.5}):
        with pytest.raises(ValueError):
            tokenreduce.patch(model, "tome-vision", **bad)


def test_a_freed_layer_output_map_is_never_given_to_a_later_tensor():
    """A layer output's source map is found for that tensor only: once the tensor is freed, a new tensor
    (which CPython often puts at the freed address, i.e. the same ``id()``) gets no map, not the stale one."""
    ctx = TowerPass(size=torch.ones(1, 4), source=torch.arange(4).expand(1, 4))
    kept = torch.zeros(1, 4, 3)
    ctx.record(kept)
    freed = torch.zeros(1, 2, 3)
    ctx.source = torch.tensor([[0, 0, 1, 1]])
    ctx.record(freed)
    stale = id(freed)
    del freed
    reused = [torch.zeros(1, 2, 3) for _ in range(50)]  # some of these land at the freed address
    assert any(id(t) == stale for t in reused)
    assert all(ctx.source_of(t) is None for t in reused)
    assert torch.equal(ctx.source_of(kept), torch.arange(4).expand(1, 4))
