"""LSH references (tokenreduce/ops/lsh.py) against bit-by-bit naive computations, and the compiled
kernels against the references."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tokenreduce import kernels
from tokenreduce.ops.lsh import (
    hamming_top1,
    hamming_top1_reference,
    lsh_planes,
    lsh_signatures,
    lsh_signatures_reference,
)


def naive_bits(x: torch.Tensor, planes: torch.Tensor) -> list[list[int]]:
    proj = x.float() @ planes.float()
    return [[int(v > 0) for v in row] for row in proj.reshape(-1, planes.shape[1]).tolist()]


def unpack(words: torch.Tensor, bits: int) -> list[list[int]]:
    out = []
    for row in words.reshape(-1, words.shape[-1]).tolist():
        out.append([(row[i // 64] >> (i % 64)) & 1 for i in range(bits)])
    return out


def test_planes_are_seeded_and_shaped():
    a, b = lsh_planes(16, 70, seed=3), lsh_planes(16, 70, seed=3)
    assert a.shape == (16, 70) and torch.equal(a, b)
    assert not torch.equal(a, lsh_planes(16, 70, seed=4))
    assert lsh_planes(16, 70, seed=3, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bits >= 1"):
        lsh_planes(16, 0)


@pytest.mark.parametrize("bits", [1, 63, 64, 65, 128, 200])
def test_signatures_pack_sign_bits_little_endian(bits):
    torch.manual_seed(bits)
    x, planes = torch.randn(3, 5, 12), lsh_planes(12, bits, seed=1)
    sig = lsh_signatures(x, planes)
    assert sig.shape == (3, 5, math.ceil(bits / 64)) and sig.dtype == torch.int64
    assert unpack(sig, bits) == naive_bits(x, planes)
    padding = sig[..., -1] >> (bits % 64) if bits % 64 else torch.zeros(1, dtype=torch.int64)
    assert (padding == 0).all()  # unused high bits of the last word stay clear


def test_signature_of_zero_vector_and_sign_bit_word():
    planes = lsh_planes(4, 64, seed=0)
    assert lsh_signatures(torch.zeros(2, 4), planes).tolist() == [[0], [0]]
    x = torch.randn(50, 4)
    assert (lsh_signatures(x, planes) < 0).any()  # bit 63 lands in int64's sign bit


def test_signature_shape_errors():
    with pytest.raises(ValueError, match="last dimension"):
        lsh_signatures(torch.randn(3, 5), lsh_planes(4, 8))
    with pytest.raises(ValueError, match="floating point"):
        lsh_signatures(torch.ones(3, 4, dtype=torch.long), lsh_planes(4, 8))


def naive_top1(query: torch.Tensor, store: torch.Tensor) -> tuple[list[int], list[int]]:
    idx, dist = [], []
    for q in query.tolist():
        best = (64 * len(q) + 1, -1)
        for s_i, s in enumerate(store.tolist()):
            d = sum(bin((a ^ b) & (2 ** 64 - 1)).count("1") for a, b in zip(q, s, strict=True))
            best = min(best, (d, s_i))
        dist.append(best[0] if store.shape[0] else 64 * len(q))
        idx.append(best[1])
    return idx, dist


@pytest.mark.parametrize("words", [1, 2, 3])
def test_hamming_top1_matches_naive(words):
    gen = torch.Generator().manual_seed(words)
    store = torch.randint(-2 ** 63, 2 ** 63 - 1, (9, words), generator=gen, dtype=torch.int64)
    query = torch.cat([store[[4, 2]], store[:3] ^ 5, torch.randint(-2 ** 63, 2 ** 63 - 1, (4, words),
                                                                     generator=gen, dtype=torch.int64)])
    index, distance = hamming_top1(query, store, chunk=3)
    assert (index.tolist(), distance.tolist()) == naive_top1(query, store)
    assert index[:2].tolist() == [4, 2] and distance[:2].tolist() == [0, 0]


def test_hamming_top1_ties_go_to_lowest_index():
    store = torch.tensor([[0b1100], [0b0011], [0b1100]], dtype=torch.int64)
    index, distance = hamming_top1(torch.tensor([[0b1100], [0b0000]], dtype=torch.int64), store)
    assert index.tolist() == [0, 0] and distance.tolist() == [0, 2]


def test_hamming_top1_empty_store_and_query():
    index, distance = hamming_top1(torch.ones(3, 2, dtype=torch.int64), torch.empty(0, 2, dtype=torch.int64))
    assert index.tolist() == [-1] * 3 and distance.tolist() == [128] * 3
    index, distance = hamming_top1(torch.empty(0, 2, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64))
    assert index.shape == (0,) and distance.shape == (0,)


def test_hamming_top1_shape_errors():
    with pytest.raises(ValueError, match="same W"):
        hamming_top1(torch.ones(3, 2, dtype=torch.int64), torch.ones(3, 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        hamming_top1(torch.ones(3, 1, dtype=torch.int32), torch.ones(3, 1, dtype=torch.int32))


def test_similar_vectors_get_close_signatures():
    torch.manual_seed(0)
    planes = lsh_planes(64, 256, seed=0)
    store = torch.randn(20, 64)
    query = store[[7, 13]] + 0.05 * torch.randn(2, 64)
    index, _ = hamming_top1(lsh_signatures(query, planes), lsh_signatures(store, planes))
    assert index.tolist() == [7, 13]


kernel_tests = pytest.mark.skipif(os.environ.get("TOKENREDUCE_KERNELS", "").strip().lower() in ("0", "off"),
                                  reason="TOKENREDUCE_KERNELS=0 switches the kernels off")


@kernel_tests
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,dim,bits", [(1, 8, 1), (37, 16, 64), (5, 64, 130), (0, 4, 70)])
def test_lsh_signatures_kernel_matches_reference(dtype, rows, dim, bits):
    kernels.build("cpu")
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(rows, 2 * dim, generator=gen).to(dtype)[:, ::2]  # non-contiguous rows
    planes = lsh_planes(dim, bits, seed=bits, dtype=dtype)
    got = torch.ops.tokenreduce.lsh_signatures(x, planes)
    assert got.shape == (rows, math.ceil(bits / 64)) and got.dtype == torch.int64
    proj = x.float() @ planes.float()
    clear = (proj.abs() > 1e-4).tolist()  # a projection within rounding of zero may take either sign
    for got_row, ref_row, ok in zip(unpack(got, bits), unpack(lsh_signatures_reference(x, planes), bits), clear,
                                    strict=True):
        assert [g for g, c in zip(got_row, ok, strict=True) if c] == [r for r, c in zip(ref_row, ok, strict=True) if c]


@kernel_tests
@pytest.mark.parametrize("nq,ns,words", [(12, 40, 1), (3, 1, 3), (0, 5, 2), (4, 0, 2)])
def test_hamming_top1_kernel_matches_reference(nq, ns, words):
    kernels.build("cpu")
    gen = torch.Generator().manual_seed(nq + ns)
    store = torch.randint(-2 ** 63, 2 ** 63 - 1, (ns, words), generator=gen, dtype=torch.int64)
    query = torch.randint(-2 ** 63, 2 ** 63 - 1, (nq, words), generator=gen, dtype=torch.int64)
    if ns > 1 and nq:
        store[ns // 2] = store[0]  # a duplicate: ties go to index 0
        query[0] = store[0] ^ 1
    got = torch.ops.tokenreduce.hamming_top1(query, store)
    ref = hamming_top1_reference(query, store)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@kernel_tests
def test_lsh_kernels_bad_shapes():
    kernels.build("cpu")
    with pytest.raises(RuntimeError, match="last dimension"):
        torch.ops.tokenreduce.lsh_signatures(torch.randn(3, 5), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="same W"):
        torch.ops.tokenreduce.hamming_top1(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="query must be torch.int64, got torch.int32"):
        torch.ops.tokenreduce.hamming_top1(torch.ones(3, 2, dtype=torch.int32), torch.ones(3, 2, dtype=torch.int32))
