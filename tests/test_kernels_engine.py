"""The compiled kernels inside tokenreduce: the ops dispatch to them when enabled (TOKENREDUCE_KERNELS),
fall back to the references when not, and the engine selects the same tokens either way."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import last_logits, video_inputs

import tokenreduce
from tokenreduce import kernels
from tokenreduce.ops import compact, importance, lsh, merge, similarity
from tokenreduce.testing import tiny_model

pytestmark = pytest.mark.skipif(os.environ.get("TOKENREDUCE_KERNELS", "").strip().lower() in ("0", "off"),
                                reason="TOKENREDUCE_KERNELS=0 switches the kernels off")


@pytest.fixture
def kernel_mode(monkeypatch):
    """Set TOKENREDUCE_KERNELS for one test (forgetting the cached per-device decisions)."""
    kernels.build("cpu")

    def set_mode(value: str) -> None:
        monkeypatch.setenv("TOKENREDUCE_KERNELS", value)
        kernels.reset()

    yield set_mode
    monkeypatch.undo()
    kernels.reset()


def calls():
    """(module, reference name, call of the public op) for every op with a kernel."""
    hidden = torch.randn(2, 9, 8)
    pred = torch.tensor([[-1, -1, -1, 0, 1, 2, 3, 4, 5]] * 2)
    cand = torch.ones(2, 9, dtype=torch.bool)
    size, index = torch.ones(2, 9), torch.tensor([[0, 3, 8], [1, 2, 8]])
    q, k = torch.randn(2, 4, 9, 8), torch.randn(2, 2, 9, 8)
    sig = torch.randint(0, 2 ** 62, (5, 1))
    return [
        (similarity, "adjacent_cosine_reference", lambda: similarity.adjacent_cosine(hidden, pred)),
        (similarity, "similar_predecessors_reference", lambda: similarity.similar_predecessors(hidden, pred, cand, .5)),
        (merge, "fold_into_heads_reference", lambda: merge.fold_into_heads(pred, cand, 4)),
        (merge, "weighted_merge_reference", lambda: merge.weighted_merge(hidden, size, pred.clamp(min=0))),
        (merge, "merge_compact_reference", lambda: merge.merge_compact(hidden, size, pred.clamp(min=0), index)),
        (compact, "take_rows_reference", lambda: compact.take_rows(hidden, index, 1)),
        (compact, "compact_kv_reference", lambda: compact.compact_kv([q, k], index)),
        (importance, "last_query_importance_reference",
         lambda: importance.last_query_importance(q, k, index, cand, 0.3)),
        (lsh, "lsh_signatures_reference", lambda: lsh.lsh_signatures(hidden, lsh.lsh_planes(8, 70))),
        (lsh, "hamming_top1_reference", lambda: lsh.hamming_top1(sig, sig)),
    ]


@pytest.mark.parametrize("case", range(10))
def test_ops_dispatch_by_mode(case, kernel_mode, monkeypatch):
    module, reference, call = calls()[case]
    expected = call()  # default mode, whatever it runs
    original = getattr(module, reference)

    def refuse(*args, **kwargs):
        raise AssertionError("reference called")

    monkeypatch.setattr(module, reference, refuse)
    kernel_mode("cpu")
    got = call()  # would raise if the reference ran
    flat = [t for t in (got if isinstance(got, (tuple, list)) else [got])]
    for a, b in zip(flat, expected if isinstance(expected, (tuple, list)) else [expected], strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    kernel_mode("0")
    with pytest.raises(AssertionError, match="reference called"):
        call()
    monkeypatch.setattr(module, reference, original)


def test_no_kernel_under_autograd(kernel_mode):
    kernel_mode("all")
    hidden = torch.randn(1, 5, 4, requires_grad=True)
    cos = similarity.adjacent_cosine(hidden, torch.tensor([[-1, 0, 1, 2, 3]]))
    cos[0, 1:].sum().backward()  # the reference ran: it has a backward
    assert hidden.grad is not None


def test_bad_mode_is_a_clear_error(kernel_mode):
    kernel_mode("fast")
    with pytest.raises(ValueError, match="TOKENREDUCE_KERNELS='fast' is not one of"):
        kernels.kernels_status()


def test_status_names_every_kernel_and_device(kernel_mode):
    kernel_mode("cpu")
    status = kernels.kernels_status()
    assert set(status) == set(kernels.KERNELS)
    assert all(s["cpu"].startswith("enabled (TOKENREDUCE_KERNELS=cpu); loaded from") for s in status.values())
    assert all(s["cuda"].startswith("disabled") or torch.cuda.is_available() for s in status.values())
    kernel_mode("0")
    assert all(s["cpu"].startswith("disabled (TOKENREDUCE_KERNELS=0)") for s in kernels.kernels_status().values())
    assert tokenreduce.kernels_status is kernels.kernels_status


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision"])
def test_framefusion_selects_the_same_tokens_with_kernels_on_and_off(family, kernel_mode):
    model = tiny_model(family)
    inputs = video_inputs(model, n=2, frames=8, text_lens=[5, 9])
    results = []
    for mode in ("0", "cpu"):
        kernel_mode(mode)
        tokenreduce.patch(model, "framefusion", retention=0.3)
        logits = last_logits(model, inputs)
        results.append((tokenreduce.stats(model).kept_indices, logits))
        tokenreduce.unpatch(model)
    assert results[0][0] == results[1][0]
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)
