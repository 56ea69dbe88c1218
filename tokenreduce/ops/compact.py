"""Compaction: gather kept rows into a right-aligned (left-padded) batch, and slice per-row tensors."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import kernels


class Compaction(NamedTuple):
    index: torch.Tensor  # [B, L'] source row of each output row (0 for padding slots)
    valid: torch.Tensor  # [B, L'] False for left-padding slots
    target: torch.Tensor  # [B, L] output row of each kept input row, -1 for the others
    ragged: bool  # samples kept different counts, so some output rows are padding


def compaction_index(keep: torch.Tensor, bounds: tuple[int, int] | None = None,
                     counts: torch.Tensor | None = None) -> Compaction:
    """Where each kept row of ``keep`` ``[B, L]`` goes in the compacted batch, and back.

    Kept rows stay in order and are right-aligned, so the last row of every sample is its last
    kept token (what ``generate`` reads) and shorter samples are left-padded. ``L'`` is the
    largest kept count: the one host sync a data-dependent length needs. Callers that already
    read the per-sample ``counts`` and their (min, max) pass them to avoid a second sync.
    """
    bsz, length = keep.shape
    counts = keep.sum(dim=1) if counts is None else counts
    if bounds is None:
        bounds = tuple(torch.stack([counts.min(), counts.max()]).tolist()) if bsz else (0, 0)
    low, new_len = bounds
    target = torch.where(keep, new_len - counts[:, None] + keep.long().cumsum(dim=1) - 1, -1)
    src = torch.arange(length, device=keep.device).expand(bsz, -1)
    index = torch.zeros(bsz, new_len + 1, dtype=torch.long, device=keep.device)
    index.scatter_(1, torch.where(keep, target, new_len), src)  # dropped rows go to a spare column
    valid = torch.arange(new_len, device=keep.device)[None, :] >= (new_len - counts)[:, None]
    return Compaction(index[:, :new_len], valid, target, low != new_len)


def take_rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` gathered along sequence dimension ``dim`` with per-sample ``index`` ``[B, L']``.

    ``t`` has its batch dimension just before ``dim`` (size B or 1, broadcast) and any number of
    leading dimensions (M-RoPE's 3 position planes) and trailing ones (head_dim)."""
    dim = dim % t.ndim
    if dim >= 1 and kernels.use("gather_rows", t):
        shape = t.shape
        lead, trail = math.prod(shape[:dim - 1]), math.prod(shape[dim + 1:])
        out = torch.ops.tokenreduce.gather_rows(t.reshape(lead, shape[dim - 1], 1, shape[dim], trail), index)
        return out.view(*shape[:dim - 1], index.shape[0], index.shape[1], *shape[dim + 1:])
    return take_rows_reference(t, index, dim)


def take_rows_reference(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Torch reference of :func:`take_rows`."""
    dim = dim % t.ndim
    bsz = index.shape[0]
    shape = list(t.shape)
    shape[dim - 1] = bsz
    t = t.expand(shape)
    idx = index.view([1] * (dim - 1) + [bsz, index.shape[1]] + [1] * (t.ndim - dim - 1))
    idx_shape = list(t.shape)
    idx_shape[dim] = index.shape[1]
    return t.gather(dim, idx.expand(idx_shape))


def compact_kv(tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's keys and values ``[B, H, L, d]`` cut down to the rows ``index`` ``[B, L']`` of
    each sample, in one call (the ``kv_compact`` kernel copies whole rows)."""
    if tensors and kernels.use("kv_compact", *tensors):
        return list(torch.ops.tokenreduce.kv_compact(tensors, index))
    return compact_kv_reference(tensors, index)


def compact_kv_reference(tensors: list[torch.Tensor], index: torch.Tensor) -> list[torch.Tensor]:
    """Torch reference of :func:`compact_kv`."""
    out = []
    for t in tensors:
        if t.ndim != 4:
            raise ValueError(f"compact_kv: every tensor must be [B, H, L, d], got shape {tuple(t.shape)}")
        out.append(t.gather(2, index[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3])))
    return out
