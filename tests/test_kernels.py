"""Compiled CPU kernels (csrc/, torch.ops.tokenreduce) held to their torch references on random inputs:
shapes, dtypes, batch sizes, empty and single-row edge cases, non-contiguous inputs, and bad shapes.

The module builds the CPU kernels once (cached across runs); it skips only when TOKENREDUCE_KERNELS=0
switches kernels off, and fails, with the compiler's reason, when they cannot be built."""

from __future__ import annotations

import os

import pytest
import torch

from tokenreduce import kernels
from tokenreduce.ops import compaction_index, same_cell_predecessor
from tokenreduce.ops.compact import compact_kv_reference, take_rows_reference
from tokenreduce.ops.importance import last_query_importance_reference
from tokenreduce.ops.merge import fold_into_heads_reference, merge_compact_reference, weighted_merge_reference
from tokenreduce.ops.similarity import similar_predecessors_reference

pytestmark = pytest.mark.skipif(os.environ.get("TOKENREDUCE_KERNELS", "").strip().lower() in ("0", "off"),
                                reason="TOKENREDUCE_KERNELS=0 switches the kernels off")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def built():
    kernels.build("cpu")


def ops():
    return torch.ops.tokenreduce


def video_rows(bsz: int, frames: int, cells: int, dim: int, dtype: torch.dtype, seed: int):
    """Hidden states of ``frames`` frames of ``cells`` tokens with text around them, where about half
    the tokens are near copies of the previous frame's, and their same-cell predecessors."""
    gen = torch.Generator().manual_seed(seed)
    length = frames * cells + 3
    hidden = torch.randn(bsz, length, dim, generator=gen)
    for f in range(1, frames):
        rows = slice(1 + f * cells, 1 + (f + 1) * cells)
        prev = slice(1 + (f - 1) * cells, 1 + f * cells)
        similar = torch.rand(bsz, cells, 1, generator=gen) < 0.5
        noisy = hidden[:, prev] + 0.3 * torch.randn(bsz, cells, dim, generator=gen)
        hidden[:, rows] = torch.where(similar, noisy, hidden[:, rows])
    group = torch.full((bsz, length), -1)
    group[:, 1:1 + frames * cells] = torch.arange(frames * cells) % cells
    return hidden.to(dtype), same_cell_predecessor(group, cells)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,frames,cells,dim", [(1, 4, 6, 16), (3, 5, 7, 40), (2, 1, 1, 8)])
def test_adjacent_similarity_matches_reference(dtype, bsz, frames, cells, dim):
    hidden, pred = video_rows(bsz, frames, cells, dim, dtype, seed=dim)
    candidate = torch.rand(pred.shape, generator=torch.Generator().manual_seed(1)) < 0.8
    sim, ok = ops().adjacent_similarity(hidden, pred, candidate, 0.6)
    ref_sim, ref_ok = similar_predecessors_reference(hidden, pred, candidate, 0.6)
    assert torch.equal(sim == float("-inf"), ref_sim == float("-inf"))
    finite = pred >= 0
    assert torch.allclose(sim[finite], ref_sim[finite], atol=2e-6, rtol=0)
    decided = (ref_sim - 0.6).abs() > 1e-5  # away from the threshold the test must agree exactly
    assert torch.equal(ok[decided], ref_ok[decided]) and bool(ok.any()) == (frames > 1)


def test_adjacent_similarity_noncontiguous_and_edges():
    hidden, pred = video_rows(2, 4, 5, 24, torch.float32, seed=0)
    transposed = hidden.transpose(0, 1).contiguous().transpose(0, 1)  # batch-major strides, rows contiguous
    strided = torch.randn(2, hidden.shape[1], 48)[..., ::2]  # last-dim stride 2
    for h in (transposed, strided):
        sim, _ = ops().adjacent_similarity(h, pred, None, 0.0)
        ref, _ = similar_predecessors_reference(h, pred, torch.ones_like(pred, dtype=torch.bool), 0.0)
        assert torch.allclose(sim, ref, atol=2e-6, rtol=0)
    zero = torch.zeros(1, 2, 4)  # zero rows: the reference's eps clamp gives cosine 0
    sim, _ = ops().adjacent_similarity(zero, torch.tensor([[-1, 0]]), None, 0.0)
    assert sim.tolist() == [[float("-inf"), 0.0]]
    for shape in [(0, 5, 8), (2, 0, 8), (2, 5, 0)]:
        sim, ok = ops().adjacent_similarity(torch.randn(shape), torch.full(shape[:2], -1), None, 0.5)
        assert sim.shape == shape[:2] and not ok.any()


def test_adjacent_similarity_bad_shapes():
    with pytest.raises(RuntimeError, match="pred must be"):
        ops().adjacent_similarity(torch.randn(2, 5, 8), torch.zeros(2, 4, dtype=torch.long), None, 0.5)
    with pytest.raises(RuntimeError, match="hidden must be"):
        ops().adjacent_similarity(torch.randn(5, 8), torch.zeros(1, 5, dtype=torch.long), None, 0.5)
    with pytest.raises(RuntimeError, match="out of range"):
        ops().adjacent_similarity(torch.randn(1, 3, 8), torch.tensor([[-1, 0, 7]]), None, 0.5)
    with pytest.raises(RuntimeError, match="candidate must"):
        ops().adjacent_similarity(torch.randn(1, 3, 8), torch.tensor([[-1, 0, 1]]), torch.ones(1, 2, dtype=torch.bool),
                                  0.5)


@pytest.mark.parametrize("max_chain", [1, 2, 5, 16])
def test_fold_runs_matches_pointer_doubling(max_chain):
    _, pred = video_rows(3, 9, 4, 4, torch.float32, seed=max_chain)
    merge = torch.rand(pred.shape, generator=torch.Generator().manual_seed(max_chain)) < 0.7
    steps = 2 ** max(1, (max(max_chain, 2) - 1).bit_length())
    assert torch.equal(ops().fold_runs(pred, merge, steps), fold_into_heads_reference(pred, merge, max_chain))
    empty = torch.empty(2, 0, dtype=torch.long)
    assert ops().fold_runs(empty, empty.bool(), 2).shape == (2, 0)
    with pytest.raises(RuntimeError, match="merge must have"):
        ops().fold_runs(pred, merge[:, 1:], 2)


def merge_case(bsz: int, length: int, dim: int, dtype: torch.dtype, seed: int):
    """Random hidden states, sizes, run heads (dest <= row, as run heads are) and the compaction of
    the surviving rows with a few dropped (pruned) rows."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(bsz, length, dim, generator=gen).to(dtype)
    size = torch.randint(1, 5, (bsz, length), generator=gen).float()
    rows = torch.arange(length).expand(bsz, -1)
    folds = torch.rand(bsz, length, generator=gen) < 0.5
    back = (torch.rand(bsz, length, generator=gen) * (rows + 1)).long()  # some earlier row
    head = torch.where(folds, back, rows)
    dest = head.clone()
    for _ in range(length.bit_length() + 1):  # resolve to final heads, as fold_into_heads does
        dest = dest.gather(1, dest)
    keep = (dest == rows) & (torch.rand(bsz, length, generator=gen) < 0.9)
    return hidden, size, dest, compaction_index(keep).index


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,length,dim", [(1, 30, 16), (4, 57, 300), (2, 1, 8)])
def test_merge_compact_equals_reference_exactly(dtype, bsz, length, dim):
    hidden, size, dest, index = merge_case(bsz, length, dim, dtype, seed=length)
    out, out_size = ops().merge_compact(hidden, size, dest, index)
    ref, ref_size = merge_compact_reference(hidden, size, dest, index)
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(out_size, ref_size)
    full = torch.arange(length).expand(bsz, -1)
    merged, new_size = ops().merge_compact(hidden, size, dest, full)  # weighted_merge alone
    assert all(torch.equal(a, b) for a, b in zip((merged, new_size), weighted_merge_reference(hidden, size, dest),
                                                 strict=True))


def test_merge_compact_noncontiguous_empty_and_bad_shapes():
    hidden, size, dest, index = merge_case(3, 20, 32, torch.float32, seed=3)
    for h in (hidden.transpose(0, 1).contiguous().transpose(0, 1), torch.cat([hidden, hidden], -1)[..., ::2]):
        got, ref = ops().merge_compact(h, size, dest, index), merge_compact_reference(h, size, dest, index)
        assert torch.equal(got[0], ref[0])
    out, out_size = ops().merge_compact(hidden, size, dest, index[:, :0])
    assert out.shape == (3, 0, 32) and out_size.shape == (3, 0)
    with pytest.raises(RuntimeError, match="size must be torch.float32, got torch.float64"):
        ops().merge_compact(hidden, size.double(), dest, index)
    with pytest.raises(RuntimeError, match="size and dest must be"):
        ops().merge_compact(hidden, size[:, 1:], dest[:, 1:], index)
    with pytest.raises(RuntimeError, match="index must have B"):
        ops().merge_compact(hidden, size, dest, index[:1])
    bad = dest.clone()
    bad[0, 0] = 20
    with pytest.raises(RuntimeError, match="out of range"):
        ops().merge_compact(hidden, size, bad, index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,hq,hkv,length,dim,n", [(1, 4, 4, 9, 8, 1), (3, 8, 2, 33, 16, 4), (2, 6, 1, 50, 64, 3)])
def test_qk_importance_matches_reference(dtype, bsz, hq, hkv, length, dim, n):
    gen = torch.Generator().manual_seed(length)
    query = torch.randn(bsz, hq, length, dim, generator=gen).to(dtype)
    key = torch.randn(bsz, hkv, length, dim, generator=gen).to(dtype)
    valid = torch.ones(bsz, length, dtype=torch.bool)
    valid[-1, : length // 3] = False  # left padding in the last sample
    q_index = torch.stack([torch.randperm(length, generator=gen)[:n].sort().values for _ in range(bsz)])
    q_index[0, 0] = 0  # a query that sees a single key
    got = ops().qk_importance(query, key, q_index, valid, dim ** -0.5)
    ref = last_query_importance_reference(query, key, q_index, valid, dim ** -0.5)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-6, rtol=1e-4)


def test_qk_importance_noncontiguous_masked_and_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 12, 3, 4, 8, generator=gen)  # [B, L, (q, k, v), H, d] as a fused projection
    query, key = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1, :2].transpose(1, 2)
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False
    q_index = torch.tensor([[10, 11], [2, 11]])  # sample 1's first query sees only padding: contributes 0
    got = ops().qk_importance(query, key, q_index, valid, 0.3)
    assert torch.allclose(got, last_query_importance_reference(query, key, q_index, valid, 0.3), atol=1e-6)
    assert ops().qk_importance(query[:, :, :0], key[:, :, :0], q_index[:, :0], valid[:, :0], 0.3).shape == (2, 0)
    with pytest.raises(RuntimeError, match="multiple of key heads"):
        ops().qk_importance(query[:, :3], key, q_index, valid, 0.3)
    with pytest.raises(RuntimeError, match="key_valid must be"):
        ops().qk_importance(query, key, q_index, valid[:, 1:], 0.3)
    with pytest.raises(RuntimeError, match="out of range"):
        ops().qk_importance(query, key, q_index + 5, valid, 0.3)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.int64, torch.bool])
def test_gather_rows_and_take_rows_shapes(dtype):
    gen = torch.Generator().manual_seed(0)
    index = torch.tensor([[0, 4, 5], [1, 2, 6]])
    for shape, dim in [((2, 7, 10), 1), ((3, 2, 7, 6), -2), ((3, 1, 7), -1), ((2, 7), 1), ((1, 7, 5), 1)]:
        t = (torch.randn(shape, generator=gen) * 10).to(dtype)
        d = dim % len(shape)
        lead, trail = shape[:d - 1], shape[d + 1:]
        t5 = t.reshape(int(torch.tensor(lead).prod()), shape[d - 1], 1, shape[d], int(torch.tensor(trail).prod()))
        out = ops().gather_rows(t5, index).view(*lead, 2, 3, *trail)
        assert torch.equal(out, take_rows_reference(t, index, dim))


def test_kv_compact_noncontiguous_empty_and_bad_shapes():
    gen = torch.Generator().manual_seed(0)
    index = torch.tensor([[0, 3], [2, 4]])
    layers = [torch.randn(2, 5, 3, 8, generator=gen).transpose(1, 2) for _ in range(3)]  # [B, H, L, d] views
    layers.append(torch.randn(2, 3, 5, 16, generator=gen)[..., ::2].to(torch.bfloat16))
    for got, ref in zip(ops().kv_compact(layers, index), compact_kv_reference(layers, index), strict=True):
        assert got.is_contiguous() and torch.equal(got, ref)
    assert ops().kv_compact(layers, index[:, :0])[0].shape == (2, 3, 0, 8)
    with pytest.raises(RuntimeError, match=r"\[B, H, L, d\]"):
        ops().kv_compact([torch.randn(2, 5, 8)], index)
    with pytest.raises(RuntimeError, match="batch dimension must be"):
        ops().kv_compact([torch.randn(3, 2, 5, 8)], index)
    with pytest.raises(RuntimeError, match="out of range"):
        ops().kv_compact(layers, index + 3)


def test_fold_runs_refuses_links_that_do_not_point_backwards():
    """A cycle (rows 1 and 2 pointing at each other) or a forward link has no run head: the kernel used to
    return the identity for it, unlike its reference; both now refuse it, naming the row."""
    merge = torch.ones(1, 3, dtype=torch.bool)
    for pred in (torch.tensor([[-1, 2, 1]]), torch.tensor([[1, -1, -1]]), torch.tensor([[-1, 1, 0]]),
                 torch.tensor([[-2, 0, 1]])):
        with pytest.raises(RuntimeError, match=r"must be -1 \(no predecessor\) or an earlier row"):
            ops().fold_runs(pred, merge, 4)
        with pytest.raises(ValueError, match=r"must be -1 \(no predecessor\) or an earlier row"):
            fold_into_heads_reference(pred, merge, 4)
    good = torch.tensor([[-1, 0, 1]])
    assert ops().fold_runs(good, merge, 4).tolist() == fold_into_heads_reference(good, merge, 4).tolist() == [[0, 0, 0]]


def test_qk_importance_refuses_different_query_and_key_lengths():
    query, key = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8)
    q_index, valid = torch.tensor([[4]]), torch.ones(1, 7, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="Lq = 5 and Lk = 7"):
        ops().qk_importance(query, key, q_index, valid, 0.3)
    with pytest.raises(ValueError, match="Lq = 5 and Lk = 7"):
        last_query_importance_reference(query, key, q_index, valid, 0.3)
