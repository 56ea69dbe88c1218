"""Per-frame views of a batch: the rows of every (sample, item, frame) laid out on a padded
``[groups, cells]`` grid by their spatial cell, for methods that work inside each frame or image."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FrameSlots(NamedTuple):
    flat: torch.Tensor  # [G, C] flat row index (sample * L + row) in each slot, 0 where empty
    present: torch.Tensor  # [G, C] bool: a current row sits in this slot
    slot: torch.Tensor  # [B, L] the slot (g * C + cell) of each member row, -1 for the others

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[B, L, ...]`` laid out as ``[G, C, ...]`` (empty slots hold row 0's values)."""
        flat = values.reshape(-1, *values.shape[2:])
        return flat[self.flat.view(-1)].view(*self.flat.shape, *values.shape[2:])

    def scatter(self, grid: torch.Tensor, fill: float | int = -1) -> torch.Tensor:
        """``grid`` ``[G, C]`` read back per row ``[B, L]``; ``fill`` for rows in no slot."""
        out = grid.reshape(-1).gather(0, self.slot.clamp(min=0).view(-1)).view(self.slot.shape)
        return torch.where(self.slot >= 0, out, torch.as_tensor(fill, dtype=grid.dtype, device=grid.device))


def frame_slots(member: torch.Tensor, item: torch.Tensor, frame: torch.Tensor, cell: torch.Tensor,
                max_items: int, max_frames: int, max_cells: int) -> FrameSlots:
    """Slots of the ``member`` rows ``[B, L]`` grouped by (sample, item, frame), placed by ``cell``.
    No host sync: empty groups stay empty. ``G = B * max_items * max_frames``, ``C = max_cells``."""
    bsz, length = member.shape
    per_sample = max_items * max_frames
    g = torch.arange(bsz, device=member.device)[:, None] * per_sample + item * max_frames + frame
    slot = torch.where(member, g * max_cells + cell, -1)
    total = bsz * per_sample * max_cells
    rows = torch.arange(bsz * length, device=member.device).view(bsz, length)
    flat = torch.zeros(total + 1, dtype=torch.long, device=member.device)
    flat.scatter_(0, torch.where(member, slot, total).view(-1), rows.view(-1))
    present = torch.zeros(total + 1, dtype=torch.bool, device=member.device)
    present.scatter_(0, torch.where(member, slot, total).view(-1), member.view(-1))
    shape = (bsz * per_sample, max_cells)
    return FrameSlots(flat[:total].view(shape), present[:total].view(shape), slot)
