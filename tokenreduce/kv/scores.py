"""Attention scores for selection from a few queries, without the L x L matrix (GQA-aware, no transformers import)."""

from __future__ import annotations

import torch


def grouped(query: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, Hq, n, d]`` -> ``[B, Hkv, g*n, d]``: query heads onto their key head (transformers' repeat_kv order)."""
    b, hq, n, d = query.shape
    return query.reshape(b, hkv, (hq // hkv) * n, d)


def window_scores(query: torch.Tensor, key: torch.Tensor, window: int, scaling: float,
                  key_valid: torch.Tensor | None) -> torch.Tensor:
    """Attention that the last ``window`` queries pay to every key, summed over those queries and each
    key head's query group: float32 ``[B, Hkv, L]``. Only ``B * Hq * window * L`` scores exist at once
    (never the ``L x L`` matrix); causal inside the window; ``key_valid`` ``[B, L]`` masks padding."""
    hkv, length = key.shape[1], key.shape[2]
    window = min(window, query.shape[2])
    q = grouped(query[:, :, -window:], hkv).float()
    logits = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # [B, Hkv, g*w, L]
    qpos = torch.arange(length - window, length, device=key.device).repeat(query.shape[1] // hkv)
    allowed = torch.arange(length, device=key.device)[None, :] <= qpos[:, None]  # [g*w, L]
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0).sum(dim=2)
