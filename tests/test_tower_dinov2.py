"""visionzip and tome-vision on a DINOv2 vision tower (LLaVA-NeXT-Video, as the organism: two tower layers
concatenated, CLS dropped, 2x2 max pooling), checked against computations written here from the layer's
parts (eager attention weights, an independent ToMe loop)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import last_logits
from torch.nn import functional as F

import tokenreduce
from tokenreduce.models.tower_probe import pool_cells
from tokenreduce.models.towers import Dinov2Block, LlavaTower
from tokenreduce.testing import DINOV2_LLAVA, make_frames, make_inputs, tiny_model
from tokenreduce.vision.tome import TowerPass, tome_layer, unmerge

FRAMES, PATCHES, CELLS = 4, 64, 16  # per video; 8x8 patches (+ CLS) per 56 px frame; 4x4 LLM tokens per frame


@functools.cache
def clip(seed: int):
    return make_frames(FRAMES, seed=seed)


def engine_memo(model) -> dict:
    return model.model.language_model.layers[0].self_attn._tokenreduce_engine.state.memo


def projections(layer) -> tuple:
    """(query, key, value, output) linear layers of a DINOv2 layer, in either transformers layout."""
    attn = layer.attention
    if hasattr(attn, "q_proj"):
        return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    return attn.attention.query, attn.attention.key, attn.attention.value, attn.output.dense


def test_tower_description():
    model = tiny_model(DINOV2_LLAVA)
    tower = LlavaTower(model, model.model, bilinear_pooling=False)
    assert tower.has_cls and tower.blocks is model.model.vision_tower.encoder.layer
    assert tower.patches(torch.zeros(2, 3, 56, 56)) == 64 and tower.patches(torch.zeros(2, 3, 112, 112)) == 256
    block = tower.block(tower.blocks[1])
    assert isinstance(block, Dinov2Block) and block.k_proj is projections(tower.blocks[1])[1]
    assert (block.heads, block.head_dim, block.scaling) == (2, 16, 16**-0.5)
    bad = tiny_model(DINOV2_LLAVA)
    bad.model.vision_tower.config.model_type = "vit"
    with pytest.raises(ValueError, match="'vit' model.*clip_vision_model, siglip_vision_model, dinov2"):
        tokenreduce.patch(bad, "visionzip")


def test_max_pooled_cells_score_by_their_most_attended_patch():
    """A cell holding one strongly attended patch outranks a cell of uniformly middling ones under max pooling
    (the token carries that patch's features); under average pooling the mean decides. Keys are averaged."""
    grid = torch.zeros(1, 3, 2, 4)  # one frame, score + 2 key channels, 2x4 patches: two 2x2 cells
    grid[0, 0, :, :2] = torch.tensor([[0.4, 0.0], [0.0, 0.0]])  # cell 0: one salient patch (mean 0.1)
    grid[0, 0, :, 2:] = 0.15  # cell 1: all middling (mean 0.15)
    grid[0, 1:] = torch.arange(16.0).view(2, 2, 4)
    best = pool_cells(grid, 2, "max")
    assert best[0, 0].flatten().tolist() == pytest.approx([0.4, 0.15])
    assert pool_cells(grid, 2, "average")[0, 0].flatten().tolist() == pytest.approx([0.1, 0.15])
    assert torch.equal(best[:, 1:], F.avg_pool2d(grid[:, 1:], 2))


def test_visionzip_ranks_by_the_cls_attention_of_the_deepest_read_layer():
    """The probe's scores equal the CLS row of the eager attention weights of tower layer 2 (vision_feature_layer
    [-2, -1] of a 3-layer tower: the deepest read layer), averaged over heads and max-pooled like the features;
    each frame keeps ceil(0.3 * 16) = 5 tokens, the 4 dominant ones being the top 4 of those scores."""
    model, eager = tiny_model(DINOV2_LLAVA), tiny_model(DINOV2_LLAVA, attn_implementation="eager")
    inputs = make_inputs(model, videos=[clip(0), clip(1)])
    tokenreduce.patch(model, "visionzip", retention=0.3)
    last_logits(model, inputs)
    s = tokenreduce.stats(model)
    notes = s.stages["visionzip"]
    assert notes["reference"] == "cls" and notes["tower_layer"] == 2
    assert [(i["kept_per_frame"], i["dominant_per_frame"]) for i in notes["items"]] == [(5, 4)] * 2
    assert s.visual_tokens_kept == [FRAMES * math.ceil(0.3 * CELLS)] * 2
    pixels = inputs["pixel_values_videos"].flatten(0, 1)
    with torch.no_grad():
        attn = eager.model.vision_tower(pixels, output_attentions=True).attentions[2]  # [8, heads, 65, 65]
    ref = F.max_pool2d(attn[:, :, 0, 1:].mean(dim=1).view(-1, 1, 8, 8), 2).flatten(1).view(2, FRAMES, CELLS)
    records = engine_memo(model)["visionzip"]["records"][2]
    for b, record in enumerate(records):
        torch.testing.assert_close(record.scores, ref[b], atol=1e-6, rtol=1e-5)
        grid = torch.from_numpy(s.kept_grid(b, 0, layer=0).reshape(FRAMES, -1))
        assert grid.sum(dim=1).tolist() == [5] * FRAMES
        assert all(grid[f, ref[b, f].topk(4).indices].all() for f in range(FRAMES))


def test_visionzip_retention_one_is_dense_and_reduced_generation_runs():
    model = tiny_model(DINOV2_LLAVA)
    inputs = make_inputs(model, videos=[clip(0)])
    images = make_inputs(model, images=[clip(1)[0]])  # any-resolution: base view + tiles, newline tokens
    dense, dense_images = last_logits(model, inputs), last_logits(model, images)
    tokenreduce.patch(model, "visionzip", retention=1.0)
    assert torch.equal(last_logits(model, inputs), dense)
    assert torch.equal(last_logits(model, images), dense_images)
    tokenreduce.patch(model, "visionzip", retention=0.3)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 and tokenreduce.stats(model).visual_tokens_kept == [20]
    last_logits(model, images)
    s = tokenreduce.stats(model)
    kept, tokens = s.visual_tokens_kept[0], s.stages["visionzip"]["items"][0]["tokens_per_frame"]
    assert kept - math.ceil(0.3 * tokens) == s.visual_tokens_in[0] - tokens  # the patch tokens' budget + newlines


def test_tome_layer_on_duplicate_pairs_reproduces_the_dense_dinov2_layer():
    """CLS then tokens in identical pairs: merging every pair (CLS protected) with proportional attention gives
    every token the dense layer's output exactly, through DINOv2's per-channel layer-scale on both branches."""
    model = tiny_model(DINOV2_LLAVA)
    layer = model.model.vision_tower.encoder.layer[1]
    block = Dinov2Block(layer)
    torch.manual_seed(1)
    x = torch.cat([torch.randn(2, 1, 32), torch.randn(2, 8, 32).repeat_interleave(2, dim=1)], dim=1)  # 1 + 16
    ctx = TowerPass(size=torch.ones(2, 17), source=torch.arange(17).expand(2, 17))
    hook = block.k_proj.register_forward_hook(lambda m, a, out: setattr(ctx, "keys", out))
    with torch.no_grad():
        dense = layer(x)
        merged = tome_layer(block, ctx, 8, True, x, None)
    hook.remove()
    assert merged.shape[1] == 9 and ctx.size[:, 0].tolist() == [1, 1] and (ctx.size[:, 1:] == 2).all()
    assert (ctx.source[:, 0] == 0).all() and (ctx.source[:, 1:] > 0).all()  # CLS alone in its token
    torch.testing.assert_close(unmerge(merged, ctx.source), dense, atol=1e-5, rtol=1e-5)


def reference_tome(tower, pixels: torch.Tensor, r: int) -> list[torch.Tensor]:
    """ToMe written out per frame from the DINOv2 layer's parts: the hidden state after each layer, unmerged
    (every patch given its token's row), ``[frames, 1 + patches, D]`` each."""
    outs = []
    for frame in tower.embeddings(pixels):
        x, groups = frame, [[i] for i in range(frame.shape[0])]  # groups: the patches each token stands for
        states = []
        for layer in tower.encoder.layer:
            q_proj, k_proj, v_proj, o_proj = projections(layer)
            heads = tower.config.num_attention_heads
            h = layer.norm1(x)
            q, k, v = (p(h).view(len(groups), heads, -1).transpose(0, 1) for p in (q_proj, k_proj, v_proj))
            size = torch.tensor([float(len(g)) for g in groups])
            weights = (q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]) + size.log()).softmax(dim=-1)
            x = x + layer.layer_scale1.lambda1 * o_proj((weights @ v).transpose(0, 1).reshape(len(groups), -1))
            key = F.normalize(k.mean(dim=0), dim=-1)
            a_side, b_side = list(range(0, len(groups), 2)), list(range(1, len(groups), 2))
            best = [(-math.inf, 0, 0) if a == 0 else max((float(key[a] @ key[b]), b, a) for b in b_side)
                    for a in a_side]  # (similarity, partner, token); CLS (token 0) never merges
            chosen = sorted(best, key=lambda t: -t[0])[:r]
            into = {a: b for _, b, a in chosen}
            rows = {i: [i] for i in range(len(groups)) if i not in into}
            for a, b in into.items():
                rows[b].append(a)
            keep = sorted(rows)
            weight = [size[rows[i]] for i in keep]
            x = torch.stack([(x[rows[i]] * w[:, None]).sum(0) / w.sum() for i, w in zip(keep, weight, strict=True)])
            groups = [sum((groups[j] for j in rows[i]), []) for i in keep]
            x = x + layer.layer_scale2.lambda1 * layer.mlp(layer.norm2(x))
            full = torch.empty(frame.shape)
            for token, members in enumerate(groups):
                full[members] = x[token]
            states.append(full)
        outs.append(torch.stack(states))
    return list(torch.stack(outs).unbind(1))


def test_tome_vision_matches_an_independent_tome_and_generates():
    """retention 0.5 on 64 patches over 3 layers: r = ceil(32 / 3) = 11 per layer (65 -> 54 -> 43 -> 32 tokens,
    CLS kept); the tower's hidden states the LLM reads (layers 1 and 2, unmerged) equal the reference's, and the
    patched model generates. r=0 is the dense model."""
    model = tiny_model(DINOV2_LLAVA)
    inputs = make_inputs(model, videos=[clip(0)])
    dense = last_logits(model, inputs)
    tokenreduce.patch(model, "tome-vision", r=0)
    assert torch.equal(last_logits(model, inputs), dense)
    tokenreduce.patch(model, "tome-vision", retention=0.5)
    seen = []
    hook = model.model.vision_tower.register_forward_hook(lambda m, a, out: seen.append(out.hidden_states))
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    hook.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    notes = tokenreduce.stats(model).stages["vision"]
    assert notes["tokens_per_layer"] == [54, 43, 32] and notes["patches_in"] == FRAMES * 65
    with torch.no_grad():
        ref = reference_tome(model.model.vision_tower, inputs["pixel_values_videos"][0], 11)
    for index in (-2, -1):  # what vision_feature_layer reads
        torch.testing.assert_close(seen[0][index], ref[index], atol=1e-5, rtol=1e-4)
    cls = seen[0][-1][:, :1]
    assert ((seen[0][-1][:, 1:] - cls).abs().amax(dim=-1) > 1e-3).all()  # no patch shares the CLS token's row


def test_frames_larger_than_the_pretrained_grid():
    """The organism's DINOv2 keeps its pretrained image_size and interpolates positions to its frames: both
    methods count the patches of the frames encoded (here 8x8 with a tower configured for 4x4)."""
    model = tiny_model(DINOV2_LLAVA, vision_config={"image_size": 28})
    inputs = make_inputs(tiny_model(DINOV2_LLAVA), videos=[clip(0)])  # 56 px frames
    tokenreduce.patch(model, "tome-vision", retention=0.5)
    last_logits(model, inputs)
    assert tokenreduce.stats(model).stages["vision"]["tokens_per_layer"] == [54, 43, 32]
    tokenreduce.patch(model, "visionzip", retention=0.3)
    last_logits(model, inputs)
    assert tokenreduce.stats(model).visual_tokens_kept == [FRAMES * 5]
