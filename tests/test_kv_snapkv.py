"""SnapKV's pooling: padding never changes a sample's selection, and ``pool="official"`` selects what the official
code (FasterDecoding/SnapKV) selects on the same tensors when every query head has its own KV head."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_kv import cache_kw, prompt, tiny_llm
from transformers import DynamicCache

import tokenreduce
from tokenreduce.kv.context import AttentionCall, KVForward
from tokenreduce.kv.methods.snapkv import SnapKV


def kept_positions(model, ids, mask, pad: int) -> list[list[list[int]]]:
    """Per layer and KV head, the prompt positions the last sample of ``ids`` kept (``pad`` left-padding columns
    subtracted)."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, **{cache_kw(model): cache})
    return [[sorted((row[row >= 0] - pad).tolist()) for row in layer.positions[-1]] for layer in cache.layers]


@pytest.mark.parametrize("pool", ["prompt", "official"])
def test_left_padding_does_not_change_the_selection(pool):
    """A sample of a left-padded batch keeps exactly the entries it keeps alone (the old pooling averaged the
    first real tokens with padding in a batch but not alone: 8 of 48 head-layers differed over these seeds)."""
    for seed in range(6):
        model = tiny_llm(seed=seed)
        long, short = prompt(90, seed=10 + seed), prompt(70, seed=20 + seed)
        ids = torch.cat([long, torch.cat([torch.zeros(1, 20, dtype=torch.long), short], 1)])
        mask = torch.ones_like(ids)
        mask[1, :20] = 0
        options = {"pool": pool} if pool != "prompt" else {}  # the default, so the test runs on older versions
        tokenreduce.patch(model, "snapkv", retention=0.2, window=8, kernel=7, **options)
        assert kept_positions(model, ids, mask, 20) == kept_positions(model, short, torch.ones_like(short), 0)


def official_selection(query, key, window: int, kernel: int, capacity: int) -> torch.Tensor:
    """The official SnapKV selection, from its description: softmax attention of the last ``window`` queries
    (scaled by 1/sqrt(d), causal inside the window), summed over the window, for the prefix keys only;
    avg_pool1d with zero padding; top ``capacity - window`` prefix entries per head, then the window."""
    length, d = key.shape[2], key.shape[3]
    logits = query[:, :, -window:] @ key.transpose(2, 3) / math.sqrt(d)
    causal = torch.triu(torch.full((window, window), float("-inf")), diagonal=1)
    logits[:, :, :, -window:] += causal
    summed = logits.softmax(-1)[:, :, :, :-window].sum(2)
    pooled = F.avg_pool1d(summed, kernel, stride=1, padding=kernel // 2)
    top = pooled.topk(capacity - window, dim=-1).indices.sort(-1).values
    return torch.cat([top, torch.arange(length - window, length).expand(*top.shape[:2], -1)], -1)


def test_official_pool_selects_as_the_official_code():
    g = torch.Generator().manual_seed(3)
    query, key = torch.randn(1, 4, 200, 16, generator=g), torch.randn(1, 4, 200, 16, generator=g)
    got = {}
    layer = SimpleNamespace(keys=key, keep=lambda index, ok: got.update(index=index, ok=ok))
    module = SimpleNamespace(scaling=16 ** -0.5)
    fwd = KVForward(True, {}, None, 200, None, None, [0], None, None)  # one unpadded prompt, nothing else used
    call = AttentionCall(0, layer, module, query, key, key, None, None, {})
    for pool in ("official", "prompt"):
        SnapKV(retention=0.25, window=16, kernel=7, pool=pool).compress(fwd, call)
        assert bool(got["ok"].all()) and got["index"].shape[-1] == 50
        same = torch.equal(got["index"], official_selection(query, key, 16, 7, 50))
        assert same == (pool == "official")  # the default pooling differs at the prefix's edges


def test_pool_option_is_checked():
    with pytest.raises(ValueError, match="unknown pool .max.; available: prompt, official"):
        SnapKV(pool="max")
