"""Size-weighted merging of rows into their run heads."""

from __future__ import annotations

import math

import torch


def fold_into_heads(pred: torch.Tensor, merge: torch.Tensor, max_chain: int) -> torch.Tensor:
    """Destination row ``[B, L]`` of every row: itself, or the head of its run of merged rows.

    A row with ``merge`` set folds into ``pred`` (its predecessor), which may itself fold further:
    chains are resolved by pointer doubling in ``ceil(log2(max_chain))`` gathers.
    """
    rows = torch.arange(pred.shape[1], device=pred.device).expand_as(pred)
    dest = torch.where(merge & (pred >= 0), pred, rows)
    for _ in range(max(1, math.ceil(math.log2(max(max_chain, 2))))):
        dest = dest.gather(1, dest)
    return dest


def weighted_merge(hidden: torch.Tensor, size: torch.Tensor, dest: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row becomes the size-weighted mean of the rows that fold into it (``dest``), and its
    size the sum of their sizes. Rows that fold elsewhere are left as they are (they get dropped).
    Accumulates in float32. A deliberate improvement on FrameFusion's unweighted mean."""
    dim = hidden.shape[-1]
    idx = dest[..., None].expand(-1, -1, dim)
    total = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    total.scatter_add_(1, idx, hidden.float() * size[..., None])
    new_size = torch.zeros_like(size).scatter_add_(1, dest, size)
    is_head = new_size > 0
    merged = torch.where(is_head[..., None], total / new_size.clamp(min=1e-6)[..., None], hidden.float())
    return merged.to(hidden.dtype), torch.where(is_head, new_size, size)
