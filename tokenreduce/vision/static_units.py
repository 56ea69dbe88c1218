"""Static spatial merge units of Qwen-VL video pixels: which units to encode and who represents the rest.

Qwen-VL's processor emits one row per patch (``channels x temporal_patch_size x patch x patch`` values),
ordered by temporal patch, then by spatial merge unit (the ``merge x merge`` patch group that becomes one
LLM token), then by patch inside the unit. A unit is *static* when its pixels barely differ from the same
unit of the previous temporal patch: the idea of run-length tokenization (Choudhury et al., "Don't Look
Twice: Faster Video Transformers with Run-Length Tokenization", NeurIPS 2024) applied at the VLM's own
token granularity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class UnitPlan:
    """Per video of one encoder call: ``keep`` ``[T * U]`` bool (unit encoded) and ``rep`` ``[T * U]`` the
    unit (same video, local index ``t * U + u``) whose features stand for each unit: itself when kept, else
    the last kept unit at the same place in an earlier temporal patch. ``change`` ``[T * U]`` is the mean
    absolute pixel difference from the previous temporal patch (inf for the first)."""

    frames: int
    units: int
    keep: torch.Tensor
    rep: torch.Tensor
    change: torch.Tensor

    @property
    def encoded(self) -> int:
        return int(self.keep.sum())


def unit_changes(pixels: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> list[torch.Tensor]:
    """Per video ``[T, U]``: mean absolute difference of each unit's pixel values (in the processor's
    normalised units) from the same unit one temporal patch earlier; ``inf`` for the first temporal patch."""
    unit = merge * merge
    rows = pixels.reshape(-1, unit * pixels.shape[-1])
    sizes = (grid_thw.prod(-1) // unit).tolist()
    out = []
    for (t, h, w), part in zip(grid_thw.tolist(), rows.split(sizes), strict=True):
        x = part.reshape(t, (h // merge) * (w // merge), -1)
        first = torch.full((1, x.shape[1]), math.inf, device=x.device)
        out.append(torch.cat([first, (x[1:].float() - x[:-1].float()).abs().mean(-1)]))
    return out


def plan_units(change: torch.Tensor, threshold: float | None, retention: float | None) -> UnitPlan:
    """Which units of one video to encode (``change`` ``[T, U]`` from :func:`unit_changes`).

    ``threshold`` only: drop every unit whose change is under it. ``retention``: encode
    ``ceil(retention * T * U)`` units, dropping the least-changing first (with ``threshold`` too, never a
    unit whose change reaches the threshold, so more may be kept). The first temporal patch is always
    encoded: it has nothing to repeat."""
    frames, units = change.shape
    flat = change.flatten()
    droppable = torch.isfinite(flat)
    if threshold is not None:
        droppable &= flat < threshold
    if retention is not None:
        limit = frames * units - math.ceil(frames * units * retention - 1e-9)
        order = torch.where(droppable, flat, math.inf).argsort(stable=True)
        chosen = torch.zeros_like(droppable)
        chosen[order[:limit]] = True
        droppable &= chosen
    keep = ~droppable
    t_index = torch.arange(frames, device=change.device)[:, None].expand(frames, units)
    last_kept = torch.where(keep.view(frames, units), t_index, -1).cummax(dim=0).values  # >= 0: t = 0 is kept
    rep = last_kept * units + torch.arange(units, device=change.device)
    return UnitPlan(frames, units, keep, rep.flatten(), flat)
