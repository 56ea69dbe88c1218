"""Top-k selection with a different k per sample, deterministic under ties."""

from __future__ import annotations

import torch


def topk_mask(scores: torch.Tensor, candidates: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: the ``k[b]`` highest-scoring candidate rows of each sample.

    Ties are broken by position (earlier first) via a stable sort, so a batch selects exactly
    what its samples select alone.
    """
    masked = torch.where(candidates, scores.float(), float("-inf"))
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(scores.shape[1], device=scores.device)
                                            .expand_as(order))
    return candidates & (rank < k[:, None])
