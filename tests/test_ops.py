"""Tensor primitives against hand-computed or naive references."""

from __future__ import annotations

import torch

from tokenreduce.engine.masks import select_mask
from tokenreduce.ops import (
    adjacent_cosine,
    compaction_index,
    fold_into_heads,
    last_query_importance,
    same_cell_predecessor,
    take_rows,
    topk_mask,
    weighted_merge,
)


def test_same_cell_predecessor_pairs_same_group_in_order():
    group = torch.tensor([[-1, 0, 1, 0, 1, -1, 0, 2], [5, 5, -1, 5, 3, 3, -1, -1]])
    pred = same_cell_predecessor(group, num_groups=6)
    assert pred.tolist() == [[-1, -1, -1, 1, 2, -1, 3, -1], [-1, 0, -1, 1, -1, 4, -1, -1]]


def test_adjacent_cosine():
    hidden = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]]])
    cos = adjacent_cosine(hidden, torch.tensor([[-1, 0, 0]]))
    assert cos[0, 0] == float("-inf")
    assert torch.allclose(cos[0, 1:], torch.tensor([2 ** -0.5, 1.0]))


def test_fold_into_heads_resolves_chains():
    pred = torch.tensor([[-1, 0, 1, 2, -1, 4]])
    merge = torch.tensor([[False, True, True, False, False, True]])
    assert fold_into_heads(pred, merge, max_chain=8).tolist() == [[0, 0, 0, 3, 4, 4]]


def test_weighted_merge_uses_and_carries_sizes():
    hidden = torch.tensor([[[0.0], [3.0], [10.0]]])
    size = torch.tensor([[1.0, 2.0, 1.0]])
    merged, new_size = weighted_merge(hidden, size, torch.tensor([[0, 0, 2]]))
    assert torch.allclose(merged[0, 0], torch.tensor([2.0]))  # (0*1 + 3*2) / 3
    assert new_size.tolist() == [[3.0, 2.0, 1.0]]
    assert merged[0, 2].item() == 10.0


def test_compaction_is_right_aligned_and_ordered():
    keep = torch.tensor([[True, False, True, True], [False, True, False, False]])
    index, valid, target, padded = compaction_index(keep)
    assert target.tolist() == [[0, -1, 1, 2], [-1, 2, -1, -1]]
    assert index[0].tolist() == [0, 2, 3]
    assert index[1, -1].item() == 1 and valid.tolist() == [[True, True, True], [False, False, True]]
    assert padded and not compaction_index(keep[:1]).ragged


def test_take_rows_handles_broadcast_batch_and_leading_planes():
    t = torch.arange(2 * 1 * 5 * 3).view(2, 1, 5, 3)  # e.g. M-RoPE planes x batch(1) x seq x dim
    index = torch.tensor([[0, 4], [1, 2]])
    out = take_rows(t, index, -2)
    assert out.shape == (2, 2, 2, 3)
    assert torch.equal(out[1, 1], t[1, 0, [1, 2]]) and torch.equal(out[0, 0], t[0, 0, [0, 4]])


def test_topk_mask_per_sample_k_and_stable_ties():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0]])
    cand = torch.tensor([[True, True, True, True], [True, True, True, False]])
    out = topk_mask(scores, cand, torch.tensor([2, 2]))
    assert out.tolist() == [[True, True, False, False], [False, True, True, False]]


def test_importance_equals_naive_attention_average():
    torch.manual_seed(0)
    bsz, hq, hkv, length, dim = 2, 4, 2, 7, 8
    q, k = torch.randn(bsz, hq, length, dim), torch.randn(bsz, hkv, length, dim)
    valid = torch.ones(bsz, length, dtype=torch.bool)
    valid[1, :2] = False  # left padding in sample 1
    q_index = torch.tensor([[5, 6], [5, 6]])
    got = last_query_importance(q, k, q_index, valid, scaling=dim ** -0.5)
    krep = k.repeat_interleave(hq // hkv, dim=1)
    logits = q @ krep.transpose(-1, -2) * dim ** -0.5
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    logits = logits.masked_fill(~(causal[None, None] & valid[:, None, None, :]), float("-inf"))
    expected = torch.softmax(logits, -1)[:, :, 5:7].mean(dim=(1, 2))
    assert torch.allclose(got, expected, atol=1e-6)


def test_select_mask_matches_the_full_mask_and_masks_padding():
    length = 6
    full = torch.ones(length, length, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    full[1, ..., :1] = False  # sample 1 is left-padded by one token
    rows = torch.tensor([[0, 2, 3, 5], [-1, 1, 4, 5]])
    out = select_mask(full, rows.clamp(min=0), rows >= 0, rows, past=0)
    assert torch.equal(out[0, 0], full[0, 0][rows[0]][:, rows[0]])
    assert not out[1, 0, 1:, 0].any() and out[1, 0, 0].all()  # padding key masked; padding query finite
    assert select_mask(None, rows[:1], rows[:1] >= 0, rows[:1], past=0) is None
    additive = torch.zeros(1, 1, length, length).masked_fill(~full[:1], torch.finfo(torch.float32).min)
    assert torch.equal(select_mask(additive, rows[:1], rows[:1] >= 0, rows[:1], past=0) == 0,
                       out[:1])
