"""The switches that reproduce two documented deviations' official behaviour, for ablations: ``merge``
(FrameFusion, AIM: ``"weighted"``, ours, or the official unweighted ``"official"``) and ``positions``
(FastV, PyramidDrop: ``"original"``, ours, or ``"renumbered"``). Each test checks the rule itself against
a reference built independently of the engine, and that the two settings really differ there."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import last_logits, sample_of, video_inputs

import tokenreduce
from tokenreduce.layout import TEXT, VIDEO
from tokenreduce.methods import Selection, Step, VisualMethod, make_method
from tokenreduce.methods.aim import aim_grouping
from tokenreduce.ops.merge import weighted_merge_reference
from tokenreduce.testing import make_frames, make_inputs, tiny_model

LLAVA = ["llava_onevision", "llava_next_video"]
QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def test_defaults_are_ours():
    assert make_method("framefusion").merge == make_method("aim").merge == "weighted"
    assert make_method("fastv").positions == make_method("pyramiddrop").positions == "original"


@pytest.mark.parametrize("name, option, choices", [
    ("framefusion", "merge", "weighted, official"), ("aim", "merge", "weighted, official"),
    ("fastv", "positions", "original, renumbered"), ("pyramiddrop", "positions", "original, renumbered"),
])
def test_bad_switch_values_name_the_choices(name, option, choices):
    with pytest.raises(ValueError, match=f"^{name}: unknown {option} 'unweighted'; available: {choices}$"):
        make_method(name, **{option: "unweighted"})


# merge: weighted vs official ----------------------------------------------------------------------
def _hook_inputs(block, key: str, seen: dict):
    def grab(module, args, kwargs):
        seen[key] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
    return block.register_forward_pre_hook(grab, with_kwargs=True)


def _run_heads(kept: list[int], rows: list[int], frame: list[int], cell: list[int]) -> dict[int, int]:
    """FrameFusion's rule, independently: each of ``rows`` that is not ``kept`` folded into the nearest earlier
    kept row of its spatial cell (the first token of its run of similar consecutive-frame tokens)."""
    kept_set, last, head = set(kept), {}, {}
    for r in rows:
        if frame[r] < 0:
            assert r in kept_set, "a non-frame row was removed by a merging step"
            continue
        if r in kept_set:
            last[cell[r]] = r
        else:
            head[r] = last[cell[r]]
    return head


@pytest.mark.parametrize("merge", ["weighted", "official"])
def test_framefusion_merge_gives_the_mean_it_names(merge):
    """Tokens merged before layer 0 are merged again before layer 1. There ``weighted`` (ours) makes each
    run the mean of its rows weighted by the original tokens each stands for; ``official`` the plain mean of
    the hidden states being merged, each row counted once (the official code: sizes are not tracked)."""
    model = tiny_model("llava_onevision")
    inputs = video_inputs(model)
    block, seen = model.model.language_model.layers[1], {}
    before = _hook_inputs(block, "before", seen)  # runs before the engine's hook: layer 0's output rows
    tokenreduce.patch(model, "framefusion", retention=0.1, similarity_threshold=0.7, ratio_lower_bound=0.0,
                      merge=merge)
    after = _hook_inputs(block, "after", seen)  # after it: the merged, compacted rows layer 1 gets
    with torch.no_grad():
        model(**inputs)
    before.remove(), after.remove()
    s = tokenreduce.stats(model)
    rows0, rows1 = s.kept_indices[0][0], s.kept_indices[0][1]
    assert len(rows0) < inputs["input_ids"].shape[1] and len(rows1) < len(rows0)  # merged before 0 and 1
    frame, cell = s.layout.frame[0].tolist(), s.layout.cell[0].tolist()
    size = {r: 1 for r in rows0}
    for head in _run_heads(rows0, range(len(frame)), frame, cell).values():
        size[head] += 1
    heads1 = _run_heads(rows1, rows0, frame, cell)
    hidden = {r: seen["before"][0, i].double() for i, r in enumerate(rows0)}

    def expected(weight: dict[int, int]) -> torch.Tensor:
        out = []
        for k in rows1:
            group = [k] + [j for j, h in heads1.items() if h == k]
            out.append(sum(weight[j] * hidden[j] for j in group) / sum(weight[j] for j in group))
        return torch.stack(out)

    weighted, official = expected(size), expected(dict.fromkeys(rows0, 1))
    assert (weighted - official).abs().max() > 1e-2  # some run joins rows of different sizes
    got = seen["after"][0].double()
    assert torch.allclose(got, weighted if merge == "weighted" else official, atol=1e-5, rtol=0)


def _frame_step(hidden: torch.Tensor) -> Step:
    """A hand-built step: one text row, then the 4 tokens (cells 0..3) of one video frame."""
    def row(text, visual):
        return torch.tensor([[text] + visual])
    return Step(layer=0, num_layers=4, hidden=hidden, rows=torch.arange(5)[None], size=torch.ones(1, 5),
                kind=row(TEXT, [VIDEO] * 4), item=row(-1, [0] * 4), frame=row(-1, [0] * 4),
                cell=row(-1, [0, 1, 2, 3]), importance=None, visual_in=torch.tensor([4]), max_frames=1,
                max_cells=4, max_items=1)


def test_aim_official_merge_is_the_nested_unweighted_mean():
    """A 4-token frame, two official rounds: A = {t0, t2} both match t1 (round 1 merges N // 2 = 2), then
    the merged token, now the A set's only token, merges into t3 (N // 4 = 1). Official, plain means in each
    round: ((t0 + t1 + t2) / 3 + t3) / 2, so t3 weighs 1/2 and the others 1/6; ours, size-weighted: the mean
    of the four."""
    e = torch.eye(8)
    t = torch.stack([e[0] + 0.1 * e[1], e[0], e[0] + 0.1 * e[2], e[5]])
    hidden = torch.cat([e[7][None], t])[None]  # [1, 5, 8]: the text row first
    expected = {"official": t[:3].mean(0) / 2 + t[3] / 2, "weighted": t.mean(0)}
    for merge, mean in expected.items():
        groups = aim_grouping(t[None], torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4), 0.25, rounds=2,
                              official=True, weighted=merge == "weighted")
        assert groups.rep.tolist() == [[3, 3, 3, 3]]
        share = [1 / 6, 1 / 6, 1 / 6, 1 / 2] if merge == "official" else [1.0] * 4
        assert torch.allclose(groups.weight, torch.tensor([share]))
        method = make_method("aim", rounds=2, rounding="official", prune=False, merge=merge)
        selection = method.reduce(_frame_step(hidden))
        assert selection.dest.tolist() == [[0, 1, 1, 1, 1]]  # all into the earliest member's row
        weight = torch.ones(1, 5) if selection.weight is None else selection.weight
        merged, _ = weighted_merge_reference(hidden, weight, selection.dest)
        assert torch.allclose(merged[0, 1], mean, atol=1e-6)
    assert not torch.allclose(expected["official"], expected["weighted"], atol=1e-2)


def test_aim_official_merge_in_the_model():
    """AIM's merging before layer 0 on a real frame: with one round both rules agree (every token has size 1);
    with two, a token merged in round 1 and merged again in round 2 makes them differ."""
    model = tiny_model("llava_next_video")
    inputs = video_inputs(model)
    logits = {}
    for rounds in (1, 2):
        for merge in ("weighted", "official"):
            tokenreduce.patch(model, "aim", rounds=rounds, prune=False, merge=merge)
            logits[rounds, merge] = last_logits(model, inputs)
    assert torch.allclose(logits[1, "weighted"], logits[1, "official"], atol=1e-6, rtol=0)
    assert (logits[2, "weighted"] - logits[2, "official"]).abs().max() > 1e-4


@dataclass
class SizeProbe(VisualMethod):
    """Test method: record the rows' sizes before layer 1 and reduce nothing."""

    name: ClassVar[str] = "size-probe"
    seen: list = field(default_factory=list)

    def act_layers(self, num_layers):
        return {1}

    def reduce(self, step: Step) -> None:
        self.seen.append(step.size[step.valid])
        return None


@pytest.mark.parametrize("merge", ["weighted", "official"])
def test_official_merge_still_counts_sizes(merge):
    """Under either rule a merged row's size is the number of original tokens it stands for (what a method
    composed after it reads), not the sum of the merge's weights (the official shares sum to 1 per group)."""
    model = tiny_model("llava_next_video")
    inputs = video_inputs(model)
    probe = SizeProbe()
    tokenreduce.patch(model, [make_method("aim", rounds=2, prune=False, merge=merge), probe])
    last_logits(model, inputs)
    size = probe.seen[-1]
    assert size.sum() == inputs["input_ids"].shape[1] and size.max() >= 3


# positions: original vs renumbered --------------------------------------------------------------
def _layer0_input(model, inputs) -> torch.Tensor:
    seen = {}
    handle = _hook_inputs(model.model.language_model.layers[0], "h", seen)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["h"]


def _reference(model, embeds: torch.Tensor, kept: list[list[int]], renumber_from: int, new_ids=(),
               new_from: int | None = None) -> torch.Tensor:
    """The last position's logits of the unpatched model run layer by layer by hand: layer ``l`` gets only
    the prompt rows ``kept[l]`` (original indices) and the generated tokens ``new_ids``, causal among them,
    at their original positions before layer ``renumber_from`` and at 0, 1, 2, ... (kept rows, then the
    generated ones) from it on. ``new_from``: the generated tokens' first position in those layers instead
    (to check that the test tells a wrong continuation apart)."""
    lm = model.model.language_model
    length = embeds.shape[1]
    new = list(range(length, length + len(new_ids)))
    h = torch.cat([embeds, lm.embed_tokens(torch.tensor([list(new_ids)], dtype=torch.long))], dim=1)
    rows = list(range(length)) + new
    with torch.no_grad():
        for idx, layer in enumerate(lm.layers):
            keep = list(kept[idx]) + new
            h = h[:, [rows.index(r) for r in keep]]
            rows = keep
            if idx < renumber_from:
                pos = torch.tensor(keep)
            else:
                start = len(kept[idx]) if new_from is None else new_from
                pos = torch.cat([torch.arange(len(kept[idx])), torch.arange(start, start + len(new))])
            mask = torch.ones(len(keep), len(keep), dtype=torch.bool).tril()[None, None]
            h = layer(h, attention_mask=mask, position_ids=pos[None], position_embeddings=lm.rotary_emb(h, pos[None]))
        return model.lm_head(lm.norm(h))[:, -1].float()


POSITION_CASES = [("fastv", {"retention": 0.1}, 2), ("pyramiddrop", {"retention": 0.3, "layers": (1, 3)}, 1)]


@pytest.mark.parametrize("family", LLAVA)
@pytest.mark.parametrize("name, options, first_drop", POSITION_CASES)
def test_renumbered_positions_equal_the_kept_tokens_fed_alone(family, name, options, first_drop):
    """From the first drop on, ``renumbered`` gives the logits of the model fed only the kept tokens at
    positions 0..n-1 (earlier layers: every token at its own position); ``original`` those of the kept tokens
    at their original positions. The two differ far more than either differs from its reference."""
    model = tiny_model(family)
    inputs = video_inputs(model)
    embeds = _layer0_input(model, inputs)
    for positions in ("original", "renumbered"):
        tokenreduce.patch(model, name, positions=positions, **options)
        got = last_logits(model, inputs)
        kept = tokenreduce.stats(model).kept_indices[0]
        tokenreduce.unpatch(model)
        assert len(kept[-1]) < len(kept[0])
        renumbered, original = (_reference(model, embeds, kept, r) for r in (first_drop, len(kept)))
        assert (renumbered - original).abs().max() > 1e-3
        assert torch.allclose(got, renumbered if positions == "renumbered" else original, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", LLAVA)
@pytest.mark.parametrize("name, options, first_drop", POSITION_CASES)
def test_renumbered_batch_equals_singles(family, name, options, first_drop):
    """Left padding: every sample is renumbered over its own kept rows, as when it runs alone."""
    model = tiny_model(family)
    tokenreduce.patch(model, name, positions="renumbered", **options)
    batch = make_inputs(model, videos=[make_frames(8, seed=3), make_frames(8, seed=4)], text_lens=[4, 11])
    got = last_logits(model, batch)
    kept = tokenreduce.stats(model).kept_indices
    pad = (batch["attention_mask"] == 0).sum(dim=1).tolist()
    assert pad[0] > 0
    for b in range(2):
        assert torch.allclose(got[b], last_logits(model, sample_of(batch, b))[0], atol=1e-4, rtol=0)
        assert [[i - pad[b] for i in layer] for layer in kept[b]] == tokenreduce.stats(model).kept_indices[0]


def test_generation_after_a_renumbered_prefill_continues_from_the_kept_length():
    """Greedy decoding: in the layers after the drop the generated tokens follow the kept ones (positions n,
    n+1, ... for n kept tokens), in the earlier layers the whole prompt (its original length): equal to the
    reference recomputed from scratch at every step, and not to one placing them at the original length."""
    model = tiny_model("llava_onevision")
    inputs = video_inputs(model)
    embeds = _layer0_input(model, inputs)
    length, steps = inputs["input_ids"].shape[1], 4
    tokenreduce.patch(model, "fastv", retention=0.1, positions="renumbered")
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    kept = tokenreduce.stats(model).kept_indices[0]
    tokenreduce.unpatch(model)
    new = got.sequences[0, length:].tolist()
    assert len(new) == steps
    for t in range(steps):
        expected = _reference(model, embeds, kept, 2, new[:t])
        assert torch.allclose(got.logits[t].float(), expected, atol=1e-5, rtol=0)
        assert int(expected.argmax()) == new[t]
    wrong = _reference(model, embeds, kept, 2, new[:2], new_from=length)
    assert (wrong - got.logits[2].float()).abs().max() > 1e-3


@pytest.mark.parametrize("family", QWEN)
@pytest.mark.parametrize("name", ["fastv", "pyramiddrop"])
def test_renumbered_positions_are_refused_on_mrope_models(family, name):
    model = tiny_model(family)
    with pytest.raises(ValueError, match=rf"^{name}: positions='renumbered' is not defined on "
                                         rf"{type(model).__name__}, whose M-RoPE .* use positions='original'"):
        tokenreduce.patch(model, name, positions="renumbered")
    assert not tokenreduce.is_patched(model)


@dataclass
class RenumberAll(VisualMethod):
    """Test method: drop every other visual row before layer 1 and ask for renumbered positions."""

    name: ClassVar[str] = "renumber-all"

    def act_layers(self, num_layers):
        return {1}

    def reduce(self, step: Step) -> Selection:
        return Selection.keep(step.valid & ~(step.visual & (step.row_index() % 2 == 0)), renumber=True)


def test_the_engine_refuses_a_renumbering_selection_on_mrope():
    """A method that does not check the model itself still cannot renumber M-RoPE positions silently."""
    model = tiny_model("qwen2_vl")
    inputs = video_inputs(model)
    tokenreduce.patch(model, RenumberAll())
    with pytest.raises(ValueError, match="renumber-all asks for renumbered positions, which are not defined on a "
                                         "model with M-RoPE"):
        last_logits(model, inputs)
