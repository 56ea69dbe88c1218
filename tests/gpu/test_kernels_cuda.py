"""CUDA kernels (csrc/cuda) against the torch references and the CPU kernels; skipped without CUDA.

merge_compact, fold_runs, the gathers and hamming_top1 must be bit-identical to the CPU kernels (same
arithmetic in the same order); the similarity, importance and LSH projections agree within float32
rounding. The engine must select the same tokens with the CUDA kernels on and off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenreduce
from tokenreduce import kernels
from tokenreduce.ops.compact import compact_kv_reference
from tokenreduce.ops.importance import last_query_importance_reference
from tokenreduce.ops.lsh import hamming_top1_reference, lsh_planes, lsh_signatures_reference
from tokenreduce.ops.merge import fold_into_heads_reference, merge_compact_reference
from tokenreduce.ops.similarity import similar_predecessors_reference
from tokenreduce.testing import make_frames, make_inputs, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_kernels import merge_case, video_rows  # noqa: E402
from test_kernels_lsh import unpack  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.skipif(os.environ.get("TOKENREDUCE_KERNELS", "").strip().lower() in ("0", "off"),
                                 reason="TOKENREDUCE_KERNELS=0 switches the kernels off")]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.tokenreduce


@pytest.fixture(scope="module", autouse=True)
def built():
    kernels.build("cuda")


def cuda(*tensors):
    return [t.cuda() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,frames,cells,dim", [(1, 4, 6, 16), (3, 9, 13, 3584), (2, 1, 1, 8), (2, 3, 5, 37)])
def test_similarity_and_fold(dtype, bsz, frames, cells, dim):
    hidden, pred = video_rows(bsz, frames, cells, dim, dtype, seed=dim)
    cand = torch.ones_like(pred, dtype=torch.bool)
    sim, ok = ops.adjacent_similarity(*cuda(hidden, pred, cand), 0.6)
    ref_sim, ref_ok = similar_predecessors_reference(hidden, pred, cand, 0.6)
    finite = pred >= 0
    assert torch.equal(sim.cpu().isinf(), ref_sim.isinf())
    assert torch.allclose(sim.cpu()[finite], ref_sim[finite], atol=5e-6, rtol=0)
    decided = (ref_sim - 0.6).abs() > 1e-5
    assert torch.equal(ok.cpu()[decided], ref_ok[decided])
    dest = ops.fold_runs(*cuda(pred, ref_ok), 2 ** max(1, (max(frames, 2) - 1).bit_length()))
    assert torch.equal(dest.cpu(), fold_into_heads_reference(pred, ref_ok, frames))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,length,dim", [(1, 30, 16), (4, 257, 3584), (2, 1, 8), (3, 50, 33)])
def test_merge_compact_bit_identical_to_cpu(dtype, bsz, length, dim):
    hidden, size, dest, index = merge_case(bsz, length, dim, dtype, seed=length)
    got = ops.merge_compact(*cuda(hidden, size, dest, index))
    cpu = ops.merge_compact(hidden, size, dest, index)
    assert torch.equal(got[0].cpu(), cpu[0]) and torch.equal(got[1].cpu(), cpu[1])
    ref = merge_compact_reference(*cuda(hidden, size, dest, index))
    assert torch.allclose(got[0].float(), ref[0].float(), atol=1e-2 if dtype != torch.float32 else 1e-5)
    empty = ops.merge_compact(*cuda(hidden, size, dest, index[:, :0]))
    assert empty[0].shape == (bsz, 0, dim)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bsz,hq,hkv,length,dim,n", [(1, 4, 4, 9, 8, 1), (2, 28, 4, 700, 128, 4), (2, 6, 1, 50, 64, 3)])
def test_qk_importance(dtype, bsz, hq, hkv, length, dim, n):
    gen = torch.Generator().manual_seed(length)
    query = torch.randn(bsz, hq, length, dim, generator=gen).to(dtype)
    key = torch.randn(bsz, hkv, length, dim, generator=gen).to(dtype)
    valid = torch.ones(bsz, length, dtype=torch.bool)
    valid[-1, : length // 3] = False
    q_index = torch.arange(length - n, length).expand(bsz, -1).contiguous()
    got = ops.qk_importance(*cuda(query, key, q_index, valid), dim ** -0.5)
    ref = last_query_importance_reference(query, key, q_index, valid, dim ** -0.5)
    assert torch.allclose(got.cpu(), ref, atol=1e-6, rtol=1e-3)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.int64])
def test_gathers_bit_identical(dtype):
    gen = torch.Generator().manual_seed(0)
    index = torch.tensor([[0, 4, 5], [1, 2, 6]])
    t = (torch.randn(3, 2, 1, 7, 10, generator=gen) * 10).to(dtype)
    assert torch.equal(ops.gather_rows(*cuda(t, index)).cpu(), ops.gather_rows(t, index))
    odd = t[..., 1:]  # rows not 16-byte aligned: the element-wise path
    assert torch.equal(ops.gather_rows(*cuda(odd, index)).cpu(), ops.gather_rows(odd.contiguous(), index))
    layers = [torch.randn(2, 4, 7, 16, generator=gen).to(dtype) for _ in range(4)]
    got = ops.kv_compact([x.cuda() for x in layers], index.cuda())
    for a, b in zip(got, compact_kv_reference(layers, index), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("rows,dim,bits", [(1, 8, 1), (300, 128, 64), (50, 3584, 130), (0, 4, 70)])
def test_lsh(rows, dim, bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(rows, dim, generator=gen)
    planes = lsh_planes(dim, bits, seed=1)
    got = ops.lsh_signatures(*cuda(x, planes)).cpu()
    ref = lsh_signatures_reference(x, planes)
    clear = ((x @ planes).abs() > 1e-3).tolist()  # projections within rounding of zero may take either sign
    for g, r, ok in zip(unpack(got, bits), unpack(ref, bits), clear, strict=True):
        assert [b for b, c in zip(g, ok, strict=True) if c] == [b for b, c in zip(r, ok, strict=True) if c]
    store = torch.randint(-2 ** 63, 2 ** 63 - 1, (97, 3), generator=gen, dtype=torch.int64)
    query = torch.cat([store[[5, 5]], torch.randint(-2 ** 63, 2 ** 63 - 1, (40, 3), generator=gen, dtype=torch.int64)])
    store[60] = store[5]
    for s in (store, store[:0]):
        a, b = ops.hamming_top1(*cuda(query, s)), hamming_top1_reference(query, s)
        assert torch.equal(a[0].cpu(), b[0]) and torch.equal(a[1].cpu(), b[1])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_engine_same_tokens_with_cuda_kernels(family, monkeypatch):
    model = tiny_model(family).cuda()
    inputs = {k: v.cuda() for k, v in make_inputs(model, videos=[make_frames(8, seed=i) for i in range(2)]).items()}
    kept = []
    for mode in ("0", "cuda"):
        monkeypatch.setenv("TOKENREDUCE_KERNELS", mode)
        kernels.reset()
        tokenreduce.patch(model, "framefusion", retention=0.3)
        with torch.no_grad():
            model(**inputs)
        kept.append(tokenreduce.stats(model).kept_indices)
        tokenreduce.unpatch(model)
    kernels.reset()
    assert kept[0] == kept[1]



def test_qk_importance_refuses_different_query_and_key_lengths():
    query, key = torch.randn(1, 2, 5, 8, device="cuda"), torch.randn(1, 2, 7, 8, device="cuda")
    q_index, valid = torch.tensor([[4]], device="cuda"), torch.ones(1, 7, dtype=torch.bool, device="cuda")
    with pytest.raises(RuntimeError, match="Lq = 5 and Lk = 7"):
        ops.qk_importance(query, key, q_index, valid, 0.3)


def test_fold_runs_device_assert_refuses_a_cycle():
    """Index values are checked by device asserts on CUDA (a failed one poisons the CUDA context, so it runs
    in a child process): rows 1 and 2 pointing at each other used to come back as the identity."""
    code = ("import torch\nfrom tokenreduce import kernels\nkernels.build('cuda')\n"
            "pred = torch.tensor([[-1, 2, 1]], device='cuda')\n"
            "out = torch.ops.tokenreduce.fold_runs(pred, torch.ones_like(pred, dtype=torch.bool), 4)\n"
            "torch.cuda.synchronize()\nprint(out.tolist())\n")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode != 0 and "assert" in done.stderr.lower(), (done.stdout, done.stderr[-2000:])
