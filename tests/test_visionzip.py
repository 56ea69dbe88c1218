"""VisionZip: dominant tokens by the vision tower's attention (probed next to SDPA, checked against the
tower's eager attention weights), contextual tokens merged by key similarity, per frame / image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import sample_of
from torch.nn import functional as F

import tokenreduce
from tokenreduce.methods import VisualMethod
from tokenreduce.methods.visionzip import VisionZip, zip_frames
from tokenreduce.models import tower_probe
from tokenreduce.testing import make_frames, make_inputs, tiny_model

FRAME = {"qwen2_vl": 112, "qwen2_5_vl": 112, "qwen3_vl": 112}  # 4x4 LLM tokens per Qwen frame (tiny default: 2x2)
CELLS = {"qwen2_vl": 16, "qwen2_5_vl": 16, "qwen3_vl": 16, "llava_onevision": 16, "llava_next_video": 16}
FRAMES = {"qwen2_vl": 2, "qwen2_5_vl": 2, "qwen3_vl": 2, "llava_onevision": 4, "llava_next_video": 4}  # per video


def videos(family: str, n: int = 1) -> list:
    return [make_frames(4, size=FRAME.get(family, 56), seed=i) for i in range(n)]


def engine_of(model):
    return model.model.language_model.layers[0].self_attn._tokenreduce_engine


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("family, kind", [(f, "video") for f in CELLS] + [("qwen3_vl", "image")])
def test_retention_one_is_dense(family, kind):
    model = tiny_model(family)
    visuals = videos(family, 2)
    inputs = make_inputs(model, videos=visuals) if kind == "video" else make_inputs(
        model, images=[v[0] for v in visuals], text_lens=[5, 9])
    dense = run(model, inputs)
    tokenreduce.patch(model, "visionzip", retention=1.0)
    assert torch.allclose(run(model, inputs), dense, atol=1e-5, rtol=0)


def test_kept_tokens_per_frame_match_the_budget(family):
    model = tiny_model(family)
    inputs = make_inputs(model, videos=videos(family, 2), text_lens=[3, 8])
    tokenreduce.patch(model, "visionzip", retention=0.3, dominant_fraction=0.6)
    run(model, inputs)
    s = tokenreduce.stats(model)
    keep = -(-CELLS[family] * 3 // 10)  # ceil(0.3 * 16) = 5 per frame
    newline = 1 if family == "llava_onevision" else 0  # belongs to no frame: kept
    assert s.visual_tokens_kept == [FRAMES[family] * keep + newline] * 2
    for b in range(2):
        grid = s.kept_grid(b, 0, layer=0)
        assert grid.reshape(grid.shape[0], -1).sum(axis=1).tolist() == [keep] * FRAMES[family]
    # contextual merging keeps every token's mass: sizes of each sample's visual rows sum to its visual tokens
    state = engine_of(model).state
    visual = state.current("kind") > 0
    assert (state.size * visual).sum(dim=1).tolist() == [float(n) for n in s.visual_tokens_in]


def test_qwen_images_keep_the_budget_per_image():
    model = tiny_model("qwen2_vl")
    images = [make_frames(1, size=112, seed=0)[0], make_frames(1, size=168, seed=1)[0]]  # 16 and 36 tokens
    inputs = make_inputs(model, images=images)
    tokenreduce.patch(model, "visionzip", retention=0.25)
    run(model, inputs)
    assert tokenreduce.stats(model).visual_tokens_kept == [4, 9]


def _tower_ref_llava(eager, inputs, layer):
    pixels = inputs["pixel_values_videos"].flatten(0, 1)
    with torch.no_grad():
        attn = eager.model.vision_tower(pixels, output_attentions=True).attentions[layer]
    return attn


def test_cls_scores_match_eager_attention_and_pick_the_dominant_tokens():
    """LLaVA-NeXT-Video's CLIP tower: the probe's CLS attention equals the eager attention weights of
    the tower layer (averaged over heads, pooled like the features), and the top ones are kept."""
    model, eager = tiny_model("llava_next_video"), tiny_model("llava_next_video", attn_implementation="eager")
    inputs = make_inputs(model, videos=videos("llava_next_video"))
    tokenreduce.patch(model, "visionzip", retention=0.25, dominant_fraction=0.5)  # 4 per frame: 2 + 2
    run(model, inputs)
    probe = engine_of(model).state.memo["visionzip"]["probe"]
    assert probe.reference == "cls" and probe.layer == 0  # vision_feature_layer -2 of a 2-layer tower
    notes = tokenreduce.stats(model).stages["visionzip"]
    assert notes["items"][0]["kept_per_frame"] == 4 and notes["items"][0]["dominant_per_frame"] == 2
    attn = _tower_ref_llava(eager, inputs, 0)  # [frames, heads, 1 + 64, 1 + 64]
    ref = attn[:, :, 0, 1:].mean(dim=1).view(-1, 1, 8, 8)
    ref = F.avg_pool2d(ref, 2).flatten(1)  # the model's 2x2 average pooling: [frames, 16]
    (record,) = engine_of(model).state.memo["visionzip"]["records"][2]
    torch.testing.assert_close(record.scores, ref, atol=1e-6, rtol=1e-5)
    grid = tokenreduce.stats(model).kept_grid(0, 0, layer=0).reshape(4, -1)
    top2 = ref.topk(2, dim=1).indices
    assert grid.sum(axis=1).tolist() == [4] * 4
    assert all(grid[f, top2[f]].all() for f in range(4))


def test_siglip_mean_attention_matches_eager_weights():
    """LLaVA-OneVision's SigLIP tower has no CLS: attention received, averaged over heads and queries,
    bilinearly pooled as the model pools video features."""
    model, eager = tiny_model("llava_onevision"), tiny_model("llava_onevision", attn_implementation="eager")
    inputs = make_inputs(model, videos=videos("llava_onevision"))
    tokenreduce.patch(model, "visionzip", retention=0.25, dominant_fraction=1.0)  # dominant only: 4 per frame
    run(model, inputs)
    probe = engine_of(model).state.memo["visionzip"]["probe"]
    assert probe.reference == "mean" and probe.layer == 1  # vision_feature_layer -1: the last layer
    attn = _tower_ref_llava(eager, inputs, 1)
    ref = attn.mean(dim=(1, 2)).view(-1, 1, 8, 8)
    ref = F.interpolate(ref, size=[4, 4], mode="bilinear").flatten(1)
    (record,) = engine_of(model).state.memo["visionzip"]["records"][2]
    torch.testing.assert_close(record.scores, ref, atol=1e-6, rtol=1e-5)
    grid = tokenreduce.stats(model).kept_grid(0, 0, layer=0).reshape(4, -1)
    expected = torch.zeros(4, 16)
    expected.scatter_(1, ref.topk(4, dim=1).indices, 1.0)
    assert torch.equal(torch.from_numpy(grid), expected)  # dominant only: exactly the top 4, nothing merged


def test_qwen2_5_window_order_is_undone():
    """Qwen2.5-VL runs its tower blocks in window order; the probe's scores, compared with the eager
    attention weights of the (full-attention) last block, are back in the LLM's token order."""
    from transformers import AttentionInterface
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
    from transformers.vision_utils import get_vision_window_index

    weights = []

    def capture(module, *args, **kwargs):
        out, w = qwen.eager_attention_forward(module, *args, **kwargs)
        weights.append(w)
        return out, w

    AttentionInterface.register("visionzip_test_capture", capture)
    model = tiny_model("qwen2_5_vl")
    inputs = make_inputs(model, videos=videos("qwen2_5_vl"))
    tokenreduce.patch(model, "visionzip", retention=0.25)
    run(model, inputs)
    (record,) = engine_of(model).state.memo["visionzip"]["records"][2]
    visual = model.model.visual
    visual.config._attn_implementation = "visionzip_test_capture"
    tokenreduce.unpatch(model)
    with torch.no_grad():
        visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
    last = weights[-2:]  # the last block: full attention, one chunk per frame
    received = torch.cat([w.mean(dim=(1, 2)).flatten() for w in last]).view(-1, 4)  # window order, per merge unit
    cfg = model.config.vision_config
    window_index, _ = get_vision_window_index(inputs["video_grid_thw"], cfg.spatial_merge_size, cfg.window_size,
                                              cfg.patch_size)
    ref = received[torch.argsort(window_index)].mean(dim=1).view(2, 16)
    assert not torch.equal(window_index, torch.arange(len(window_index)))  # the order really differs
    torch.testing.assert_close(record.scores, ref, atol=1e-6, rtol=1e-5)


def test_zip_frames_dominant_targets_and_merges():
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.8, 0.0, 0.3, 0.05, 0.01]])
    keys = torch.tensor([[[1.0, 0], [1, 0.1], [0, 1], [1, 1], [0.1, 1], [1, 0.05], [0.2, 1], [1, -0.1]]])
    dest = zip_frames(scores, keys, keep=4, dominant=2)
    # dominant: cells 0 and 3; the rest in order 1 2 4 5 6 7 with step 6 // 2 = 3: targets 1 and 5
    # 2, 4, 6 point along (0, 1): nearer to target 1's (1, 0.1) than target 5's (1, 0.05); 7 nearer to 5
    assert dest.tolist() == [[0, 1, 1, 3, 1, 5, 1, 5]]
    assert zip_frames(scores, keys, keep=3, dominant=3).tolist() == [[0, -1, -1, 3, -1, 5, -1, -1]]
    assert zip_frames(scores, keys, keep=8, dominant=2).tolist() == [list(range(8))]
    all_context = zip_frames(scores, keys, keep=2, dominant=0)  # step 4: targets 0 and 4
    assert sorted(set(all_context.flatten().tolist())) == [0, 4]


def test_contextual_tokens_are_size_weighted_means():
    """The rows entering LLM layer 0 are the dense embeddings of the kept tokens, and each contextual row
    is the mean of the embeddings of its target and the tokens merged into it."""
    model = tiny_model("llava_next_video")
    inputs = make_inputs(model, videos=videos("llava_next_video"))
    seen = []
    layer0 = model.model.language_model.layers[0]
    handle = layer0.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"])[0]),
                                              with_kwargs=True)
    run(model, inputs)
    tokenreduce.patch(model, "visionzip", retention=0.25, dominant_fraction=0.5)
    handle.remove()
    handle = layer0.register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"])[0]),
                                              with_kwargs=True)
    run(model, inputs)
    handle.remove()
    dense, reduced = seen
    (record,) = engine_of(model).state.memo["visionzip"]["records"][2]
    dest = zip_frames(record.scores, record.keys, keep=4, dominant=2)  # [4 frames, 16 cells]
    start = int(torch.nonzero(inputs["input_ids"][0] == model.config.video_token_id)[0])
    visual = dense[start:start + 64].view(4, 16, -1)
    expected = []
    for f in range(4):
        for c in range(16):
            if dest[f, c] == c:
                expected.append(visual[f][dest[f] == c].mean(dim=0))
    got = reduced[start:start + 16]
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert reduced.shape[0] == dense.shape[0] - 48


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_batch_equals_each_sample_alone(family):
    model = tiny_model(family)
    inputs = make_inputs(model, videos=videos(family, 2), text_lens=[4, 9])
    tokenreduce.patch(model, "visionzip", retention=0.3)
    batch = run(model, inputs)[:, -1]
    kept = tokenreduce.stats(model).visual_tokens_kept
    for b in range(2):
        single = run(model, sample_of(inputs, b))[:, -1]
        torch.testing.assert_close(batch[b:b + 1], single, atol=1e-5, rtol=1e-4)
        assert tokenreduce.stats(model).visual_tokens_kept == [kept[b]]


def test_generate_with_beams_maps_each_copy_to_its_encoding():
    model = tiny_model("qwen2_vl")
    inputs = make_inputs(model, videos=videos("qwen2_vl", 2), text_lens=[4, 7])
    tokenreduce.patch(model, "visionzip", retention=0.25)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, num_beams=2, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert tokenreduce.stats(model).visual_tokens_kept == [8] * 4  # 2 samples x 2 beams, 2 frames x 4


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_llava_images_follow_the_models_packing(family):
    """Any-resolution images: scores and keys go through the model's own packing (base view, tiles, unpadding),
    so newline tokens (NaN score, always kept) sit exactly where the model puts its image_newline vector, the
    base view's scores are the tower's attention, and each image keeps the budget of its patch tokens."""
    model, eager = tiny_model(family), tiny_model(family, attn_implementation="eager")
    images = [make_frames(1, seed=0)[0], make_frames(1, size=112, seed=1)[0][:, :80]]  # 1 and 2 tiles, unpadded
    inputs = make_inputs(model, images=images, text_lens=[3, 6])
    dense = run(model, inputs)
    tokenreduce.patch(model, "visionzip", retention=1.0)
    assert torch.allclose(run(model, inputs), dense, atol=1e-5, rtol=0)
    tokenreduce.unpatch(model)
    tokenreduce.patch(model, "visionzip", retention=0.25)
    run(model, inputs)
    records = engine_of(model).state.memo["visionzip"]["records"][1]
    newline = model.model.image_newline.detach()
    with torch.no_grad():
        features = eager.model.get_image_features(
            inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output
    kept = []
    for record, feature in zip(records, features, strict=True):
        is_newline = (feature == newline).all(dim=-1)
        assert torch.equal(record.scores[0].isnan(), is_newline) and 0 < int(is_newline.sum()) < 32
        kept.append(int(is_newline.sum()) + -(-int((~is_newline).sum()) // 4))
    assert tokenreduce.stats(model).visual_tokens_kept == kept
    layer = 0 if family == "llava_next_video" else 1  # vision_feature_layer -2 (CLIP), -1 (SigLIP)
    with torch.no_grad():
        attn = eager.model.vision_tower(inputs["pixel_values"][0, :1], output_attentions=True).attentions[layer]
    base = attn[0, :, 0, 1:].mean(dim=0) if family == "llava_next_video" else attn[0].mean(dim=(0, 1))
    torch.testing.assert_close(records[0].scores[0, :64], base, atol=1e-6, rtol=1e-5)


def test_bad_options_are_refused():
    for bad in ({"retention": 0.0}, {"retention": 1.5}, {"dominant_fraction": 1.2}, {"layer": "last"}):
        with pytest.raises(ValueError):
            VisionZip(**bad)
    with pytest.raises(ValueError, match="vision tower has 2 layers"):
        tokenreduce.patch(tiny_model("qwen2_vl"), "visionzip", layer=5)


def test_explicit_layer_and_default_split():
    method = VisionZip()
    assert method.budget(576) == (173, 146)  # ceil(0.3 * 576), 54/64 of it
    assert VisionZip(retention=64 / 576).budget(576) == (64, 54)  # the paper's 54 dominant + 10 contextual
    model = tiny_model("llava_next_video")
    tokenreduce.patch(model, "visionzip", layer=-1)
    run(model, make_inputs(model, videos=videos("llava_next_video")))
    assert engine_of(model).state.memo["visionzip"]["probe"].layer == 1


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_next_video"])
def test_unpatch_leaves_no_hooks(family):
    model = tiny_model(family)
    inputs = make_inputs(model, videos=videos(family))
    dense = run(model, inputs)
    base = model.model
    tower = getattr(base, "visual", None) or base.vision_tower
    modules = [base, *tower.modules()]
    before = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules]
    tokenreduce.patch(model, "visionzip", retention=0.3)
    run(model, inputs)
    tokenreduce.unpatch(model)
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in modules] == before
    assert "get_image_features" not in vars(base) and "get_video_features" not in vars(base)
    assert torch.equal(run(model, inputs), dense)


@dataclass
class TowerRewriter(VisualMethod, register=False):
    """Stands for a method that changes the vision tower's output (stage "vision")."""

    name: ClassVar[str] = "tower-rewriter"
    stages: ClassVar[tuple[str, ...]] = ("vision",)

    def act_layers(self, num_layers):
        return set()


def test_composition():
    model = tiny_model("llava_next_video")
    inputs = make_inputs(model, videos=videos("llava_next_video"))
    # fastv budgets against the original 64 visual tokens: visionzip keeps 32, fastv then 16
    tokenreduce.patch(model, [VisionZip(retention=0.5), tokenreduce.FastV(retention=0.25, layer=2)])
    run(model, inputs)
    s = tokenreduce.stats(model)
    assert s.layer_tokens[0] == inputs["input_ids"].shape[1] - 32 and s.visual_tokens_kept == [16]
    tokenreduce.unpatch(model)
    with pytest.raises(ValueError, match="rewrite"):
        tokenreduce.patch(model, [TowerRewriter(), VisionZip()])
    tokenreduce.patch(model, ["framefusion", "visionzip"])  # framefusion merges before layer 0 first
    with pytest.raises(ValueError, match="every visual token"):
        run(model, make_inputs(model, videos=[make_frames(4, static=True)]))


def test_bfloat16_model():
    model = tiny_model("qwen2_5_vl", dtype=torch.bfloat16)
    inputs = make_inputs(model, videos=videos("qwen2_5_vl"))
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
    tokenreduce.patch(model, "visionzip", retention=0.25)
    assert torch.isfinite(run(model, inputs).float()).all()
    assert tokenreduce.stats(model).visual_tokens_kept == [8]


def test_received_attention_chunks_add_up(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 2, 10, 4, generator=gen), torch.randn(3, 2, 10, 4, generator=gen)
    full = (q @ k.transpose(-1, -2) * 0.5).softmax(dim=-1).mean(dim=(1, 2))
    monkeypatch.setattr(tower_probe, "ELEMENTS_PER_CHUNK", 30)  # one segment, a few queries at a time
    torch.testing.assert_close(tower_probe.mean_received_attention(q, k, 0.5), full)
    cls = (q[:, :, :1] @ k.transpose(-1, -2) * 0.5).softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)
    torch.testing.assert_close(tower_probe.cls_attention(q, k, 0.5), cls)
