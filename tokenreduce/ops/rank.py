"""Ranks and counts inside groups of rows (a frame, an image, a video), for per-group budgets."""

from __future__ import annotations

import torch


def group_rank(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` rank (0 = best) of each row among the rows of its sample with the same ``group``
    id, by descending score; ties go to the earlier row (stable), so a batch ranks exactly as its
    samples alone. Rows with ``group < 0`` get rank ``L`` (never selected)."""
    bsz, length = scores.shape
    if length == 0:
        return torch.zeros_like(group)
    member = group >= 0
    by_score = torch.sort(torch.where(member, scores.float(), float("-inf")), dim=1, descending=True,
                          stable=True).indices
    g = torch.where(member, group, group.max().clamp(min=0) + 1).gather(1, by_score)
    by_group = torch.sort(g, dim=1, stable=True).indices  # groups in order, each by descending score
    order = by_score.gather(1, by_group)
    sorted_g = g.gather(1, by_group)
    pos = torch.arange(length, device=scores.device).expand(bsz, -1)
    start = torch.where(torch.cat([torch.ones_like(sorted_g[:, :1], dtype=torch.bool),
                                   sorted_g[:, 1:] != sorted_g[:, :-1]], dim=1), pos, 0).cummax(dim=1).values
    rank = torch.empty_like(order).scatter_(1, order, pos - start)
    return torch.where(member, rank, length)


def group_count(mask: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B, num_groups]`` number of rows with ``mask`` in each group (``group < 0`` rows ignored)."""
    counts = torch.zeros(group.shape[0], num_groups + 1, dtype=torch.long, device=group.device)
    idx = torch.where(group >= 0, group, num_groups)
    counts.scatter_add_(1, idx, (mask & (group >= 0)).long())
    return counts[:, :num_groups]
