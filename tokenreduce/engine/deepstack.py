"""Qwen3-VL's deepstack visual features on reduced rows."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .prefill import ForwardState


def deepstack(st: ForwardState | None, original: Callable[..., torch.Tensor], hidden: torch.Tensor,
              visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
    """Qwen3-VL adds per-token vision features to the visual rows of its first layers. After a
    reduction, each current row gets the mean of its original tokens' features (the merged
    row is the size-weighted mean of its members, so this is what the dense rows would sum to)."""
    if st is None or st.version == 0:
        return original(hidden, visual_pos_masks, visual_embeds)
    bsz, length, dim = hidden.shape
    mask = visual_pos_masks.to(hidden.device)
    full = torch.zeros(*mask.shape, dim, dtype=torch.float32, device=hidden.device)
    full[mask] = visual_embeds.to(full)
    owner = st.owner.to(hidden.device)
    idx = torch.where(owner >= 0, owner, length)  # dropped tokens land in a spare row
    total = torch.zeros(bsz, length + 1, dim, dtype=torch.float32, device=hidden.device)
    total.scatter_add_(1, idx[..., None].expand(-1, -1, dim), full)
    count = torch.zeros(bsz, length + 1, device=hidden.device).scatter_add_(1, idx, mask.float())
    return hidden + (total[:, :length] / count[:, :length, None].clamp(min=1)).to(hidden.dtype)
