"""Compaction: gather kept rows into a right-aligned (left-padded) batch, and slice per-row tensors."""

from __future__ import annotations

import torch


def compaction_index(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Source row of each output row ``[B, L']``, its validity, and whether any row is padding.

    Kept rows stay in order and are right-aligned, so the last row of every sample is its last
    kept token (what ``generate`` reads) and shorter samples are left-padded. ``L'`` is the
    largest kept count: the one host sync a data-dependent length needs (min and max are read
    together).
    """
    bsz, length = keep.shape
    counts = keep.sum(dim=1)
    low, new_len = torch.stack([counts.min(), counts.max()]).tolist() if bsz else (0, 0)
    col = new_len - counts[:, None] + keep.long().cumsum(dim=1) - 1
    col = torch.where(keep, col, new_len)  # dropped rows go to a spare column
    src = torch.arange(length, device=keep.device).expand(bsz, -1)
    index = torch.zeros(bsz, new_len + 1, dtype=torch.long, device=keep.device).scatter_(1, col, src)
    valid = torch.arange(new_len, device=keep.device)[None, :] >= (new_len - counts)[:, None]
    return index[:, :new_len], valid, low != new_len


def take_rows(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` gathered along sequence dimension ``dim`` with per-sample ``index`` ``[B, L']``.

    ``t`` has its batch dimension just before ``dim`` (size B or 1, broadcast) and any number of
    leading dimensions (M-RoPE's 3 position planes) and trailing ones (head_dim)."""
    dim = dim % t.ndim
    bsz = index.shape[0]
    shape = list(t.shape)
    shape[dim - 1] = bsz
    t = t.expand(shape)
    idx = index.view([1] * (dim - 1) + [bsz, index.shape[1]] + [1] * (t.ndim - dim - 1))
    idx_shape = list(t.shape)
    idx_shape[dim] = index.shape[1]
    return t.gather(dim, idx.expand(idx_shape))
