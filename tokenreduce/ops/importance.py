"""Query-key importance without materialising the attention matrix (GQA-aware)."""

from __future__ import annotations

import torch

from .. import kernels


def last_query_importance(query: torch.Tensor, key: torch.Tensor, q_index: torch.Tensor,
                          key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention that a few query rows pay to every key, averaged over heads and those queries.

    query ``[B, Hq, Lq, d]`` and key ``[B, Hkv, Lk, d]`` come post-RoPE from the attention call
    (``Lq == Lk``, one row space); ``q_index`` ``[B, n]`` picks the query rows; ``key_valid``
    ``[B, Lk]`` masks padding. Query heads ``h*g .. h*g+g-1`` share key head ``h`` (transformers'
    ``repeat_kv`` order), handled by a reshape instead of repeating keys. Causal: a query never
    sees a later key. Returns float32 ``[B, Lk]``; only ``B * Hq * n * Lk`` scores exist at once.
    The ``qk_importance`` kernel (where enabled) agrees within float32 rounding.
    """
    if kernels.use("qk_importance", query, key):
        return torch.ops.tokenreduce.qk_importance(query, key, q_index, key_valid, float(scaling))
    return last_query_importance_reference(query, key, q_index, key_valid, scaling)


def last_query_importance_reference(query: torch.Tensor, key: torch.Tensor, q_index: torch.Tensor,
                                    key_valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Torch reference of :func:`last_query_importance`."""
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"last_query_importance: query and key must cover the same rows (Lq == Lk: q_index and "
                         f"the causal mask index both), got Lq = {query.shape[2]} and Lk = {key.shape[2]}")
    bsz, hq, _, dim = query.shape
    hkv, n = key.shape[1], q_index.shape[1]
    q = query.gather(2, q_index[:, None, :, None].expand(-1, hq, -1, dim))
    q = q.reshape(bsz, hkv, (hq // hkv) * n, dim)
    logits = torch.matmul(q.float(), key.float().transpose(-1, -2)) * scaling
    keys = torch.arange(key.shape[2], device=key.device)
    allowed = key_valid[:, None, :] & (keys[None, None, :] <= q_index[:, :, None])  # [B, n, Lk]
    allowed = allowed.repeat(1, hq // hkv, 1)[:, None]  # matches the (g, n) row order
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0).mean(dim=(1, 2))
