"""Budgets and top-k selection of cache entries, per sample and KV head, kept in their original order."""

from __future__ import annotations

import torch


def budgets(retention: float, valid: torch.Tensor, minimum: int = 1) -> torch.Tensor:
    """Entries to keep per sample: ``ceil(retention * n)`` of its ``n`` valid tokens (at least ``minimum``)."""
    n = valid.sum(dim=-1)
    keep = torch.ceil(n.double() * retention - 1e-9).long()
    return torch.maximum(keep, torch.minimum(n, torch.full_like(n, minimum)))


def top_entries(scores: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep[b]`` best entries of ``scores`` ``[B, H, L]`` per sample and head, ascending by index.

    Returns ``(index [B, H, k], valid [B, H, k])`` with ``k = max(keep)``; a sample that keeps fewer
    fills its tail with invalid slots (its worst extra entries, marked ``valid=False``)."""
    k = int(keep.max())
    top = scores.topk(k, dim=-1)
    rank_ok = torch.arange(k, device=scores.device)[None, None, :] < keep[:, None, None]
    index, order = top.indices.sort(dim=-1)
    return index, rank_ok.expand_as(order).gather(-1, order)
