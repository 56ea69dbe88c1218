"""Adjacent-frame similarity: each video token against the same spatial cell of the previous frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import kernels


def same_cell_predecessor(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Row index of the previous row of the same sample with the same ``group`` id, or -1.

    ``group`` ``[B, L]`` holds a per-sample id in ``[0, num_groups)`` of (item, cell) for candidate
    rows and -1 elsewhere.
    Rows are in original order, so within an item the predecessor is the nearest earlier
    remaining frame's token at the same cell. One stable sort, no loop over frames.
    """
    bsz, length = group.shape
    if length == 0:
        return group.clone()
    span = num_groups
    rows = torch.arange(length, device=group.device)
    base = torch.arange(bsz, device=group.device)[:, None] * (span + length)
    # non-candidates get ids of their own (span + row) so they never pair up
    key = (base + torch.where(group >= 0, group, span + rows)).flatten()
    order = torch.sort(key, stable=True).indices
    same = torch.zeros_like(key, dtype=torch.bool)
    same[1:] = key[order[1:]] == key[order[:-1]]
    prev = torch.full_like(key, -1)
    prev[1:] = order[:-1] % length
    pred = torch.full_like(key, -1)
    pred[order] = torch.where(same, prev, -1)
    return pred.view(bsz, length)


def adjacent_cosine(hidden: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Cosine similarity ``[B, L]`` (float32) of each row with its predecessor row; -inf without one.

    Runs the compiled ``adjacent_similarity`` kernel where it is enabled (:mod:`tokenreduce.kernels`)."""
    if kernels.use("adjacent_similarity", hidden):
        return torch.ops.tokenreduce.adjacent_similarity(hidden, pred, None, 0.0)[0]
    return adjacent_cosine_reference(hidden, pred)


def similar_predecessors(hidden: torch.Tensor, pred: torch.Tensor, candidate: torch.Tensor, threshold: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`adjacent_cosine` fused with the threshold test: ``(sim, mergeable)``, where ``mergeable``
    ``[B, L]`` marks candidate rows with a predecessor at cosine >= ``threshold`` (compared in float32).
    The kernel reads each row and its predecessor once instead of gathering a copy of ``hidden``."""
    if kernels.use("adjacent_similarity", hidden):
        return torch.ops.tokenreduce.adjacent_similarity(hidden, pred, candidate, float(threshold))
    return similar_predecessors_reference(hidden, pred, candidate, threshold)


def similar_predecessors_reference(hidden: torch.Tensor, pred: torch.Tensor, candidate: torch.Tensor,
                                   threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`similar_predecessors`."""
    sim = adjacent_cosine_reference(hidden, pred)
    return sim, candidate & (pred >= 0) & (sim >= threshold)


def adjacent_cosine_reference(hidden: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`adjacent_cosine`."""
    other = hidden.gather(1, pred.clamp(min=0)[..., None].expand(-1, -1, hidden.shape[-1]))
    cos = F.cosine_similarity(hidden.float(), other.float(), dim=-1)
    return torch.where(pred >= 0, cos, float("-inf"))
