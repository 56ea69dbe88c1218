"""Size-weighted merging of rows into their run heads."""

from __future__ import annotations

import math

import torch

from .. import kernels
from .compact import take_rows_reference


def fold_into_heads(pred: torch.Tensor, merge: torch.Tensor, max_chain: int) -> torch.Tensor:
    """Destination row ``[B, L]`` of every row: itself, or the head of its run of merged rows.

    A row with ``merge`` set folds into ``pred`` (its predecessor), which may itself fold further:
    chains are resolved by pointer doubling in ``ceil(log2(max_chain))`` gathers (the ``fold_runs``
    kernel follows each run instead, with the same result).
    """
    if kernels.use("fold_runs", pred):
        return torch.ops.tokenreduce.fold_runs(pred, merge, 2 ** _doublings(max_chain))
    return fold_into_heads_reference(pred, merge, max_chain)


def _doublings(max_chain: int) -> int:
    return max(1, math.ceil(math.log2(max(max_chain, 2))))


def fold_into_heads_reference(pred: torch.Tensor, merge: torch.Tensor, max_chain: int) -> torch.Tensor:
    """Torch reference of :func:`fold_into_heads`. ``pred`` must point backwards (-1 or an earlier row),
    else a cycle has no head; checked here for CPU tensors, as the ``fold_runs`` kernel checks (on an
    accelerator the check would stall the engine on a host sync: there the kernel's device assert checks,
    and the engine's ``pred`` comes from :func:`~tokenreduce.ops.similarity.same_cell_predecessor`, earlier
    rows by construction)."""
    if pred.device.type == "cpu" and pred.numel():
        rows = torch.arange(pred.shape[1], device=pred.device)
        bad = (pred < -1) | (pred >= rows)
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"fold_into_heads: pred[{b}, {i}] = {int(pred[b, i])} must be -1 (no predecessor) or "
                             f"an earlier row in [0, {i})")
    rows = torch.arange(pred.shape[1], device=pred.device).expand_as(pred)
    dest = torch.where(merge & (pred >= 0), pred, rows)
    for _ in range(_doublings(max_chain)):
        dest = dest.gather(1, dest)
    return dest


def weighted_merge(hidden: torch.Tensor, size: torch.Tensor, dest: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row becomes the size-weighted mean of the rows that fold into it (``dest``), and its
    size the sum of their sizes. Rows that fold elsewhere are left as they are (they get dropped).
    Accumulates in float32. A deliberate improvement on FrameFusion's unweighted mean."""
    if size.dtype == torch.float32 and kernels.use("merge_compact", hidden):
        rows = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        return torch.ops.tokenreduce.merge_compact(hidden, size, dest, rows)
    return weighted_merge_reference(hidden, size, dest)


def merge_compact(hidden: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, index: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weighted_merge` followed by the gather of rows ``index`` ``[B, L']`` of the result and
    of the sizes (:func:`~tokenreduce.ops.compact.take_rows`). The kernel computes only the kept rows,
    writing them straight into the compacted output: one read of ``hidden``, one write of the result."""
    if size.dtype == torch.float32 and kernels.use("merge_compact", hidden):
        return torch.ops.tokenreduce.merge_compact(hidden, size, dest, index)
    return merge_compact_reference(hidden, size, dest, index)


def merge_compact_reference(hidden: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, index: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`merge_compact`."""
    merged, new_size = weighted_merge_reference(hidden, size, dest)
    return take_rows_reference(merged, index, 1), new_size.gather(1, index)


def weighted_merge_reference(hidden: torch.Tensor, size: torch.Tensor, dest: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`weighted_merge`."""
    dim = hidden.shape[-1]
    idx = dest[..., None].expand(-1, -1, dim)
    total = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    total.scatter_add_(1, idx, hidden.float() * size[..., None])
    new_size = torch.zeros_like(size).scatter_add_(1, dest, size)
    is_head = new_size > 0
    merged = torch.where(is_head[..., None], total / new_size.clamp(min=1e-6)[..., None], hidden.float())
    return merged.to(hidden.dtype), torch.where(is_head, new_size, size)
