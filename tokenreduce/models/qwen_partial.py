"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision towers on a partial grid: only the kept spatial merge units.

The towers take flattened patches plus ``grid_thw`` and derive rotary positions, per-frame attention
boundaries (``cu_seqlens``), Qwen2.5-VL's window order and window boundaries, and Qwen3-VL's interpolated
position-embedding taps from the grid. transformers lets a caller pass each of these precomputed
(``transformers.vision_utils``: ``position_ids``, ``cu_seqlens``, ``window_index``, ``cu_window_seqlens``,
``interp_indices``/``interp_weights``), which is the extension point used here: the full grid's values are
computed with transformers' own helpers and restricted to the kept units, and the attention boundaries are
rebuilt from the kept units' counts. So each kept patch keeps its original 2-D rotary position and
position embedding, attends within its own temporal patch (full-attention blocks) or its own window
(Qwen2.5-VL's windowed blocks) to the kept patches there, and the tower's weights run on kept patches only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import vision_utils

PRECOMPUTED = ("position_ids", "cu_seqlens", "window_index", "cu_window_seqlens", "interp_indices", "interp_weights")


def _boundaries(group: torch.Tensor, groups: int, unit: int) -> torch.Tensor:
    """int32 cumulative patch boundaries of the non-empty groups, given each kept unit's group id."""
    counts = torch.bincount(group, minlength=groups)
    counts = counts[counts > 0] * unit
    return F.pad(counts.cumsum(0, dtype=torch.int32), (1, 0))


def partial_inputs(visual: nn.Module, grid_thw: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The precomputed tower arguments for the kept units (``keep`` ``[total units]`` bool, in the
    processor's order) of the videos/images in ``grid_thw``."""
    merge = visual.spatial_merge_size
    unit = merge * merge
    device = keep.device
    patch_keep = keep.repeat_interleave(unit)
    out = {"position_ids": vision_utils.get_vision_position_ids(grid_thw, merge)[patch_keep.to(grid_thw.device)]}
    per_frame = (grid_thw[:, 1] * grid_thw[:, 2] // unit).to(device)
    frame = torch.repeat_interleave(torch.arange(int(grid_thw[:, 0].sum()), device=device),
                                    torch.repeat_interleave(per_frame, grid_thw[:, 0].to(device)))
    out["cu_seqlens"] = _boundaries(frame[keep], int(grid_thw[:, 0].sum()), unit)
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: windowed blocks attend inside windows of units
        order, bounds = vision_utils.get_vision_window_index(grid_thw, merge, visual.window_size, visual.patch_size)
        order, bounds = order.to(device), bounds.to(device).long() // unit
        window = torch.searchsorted(bounds[1:], torch.arange(order.numel(), device=device), right=True)
        kept_in_order = keep[order]
        rank = keep.long().cumsum(0) - 1  # a kept unit's index among the kept units
        out["window_index"] = rank[order[kept_in_order]]
        out["cu_window_seqlens"] = _boundaries(window[kept_in_order], bounds.numel() - 1, unit)
    if hasattr(visual, "num_grid_per_side"):  # Qwen3-VL: learned position embeddings, interpolated per grid
        idx, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid_thw, visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=merge)
        out["interp_indices"], out["interp_weights"] = idx[patch_keep], weights[patch_keep]
    return out


def run_partial(forward, visual: nn.Module, pixels: torch.Tensor, grid_thw: torch.Tensor, keep: torch.Tensor,
                rep: torch.Tensor, **kwargs: Any):
    """Run the tower's ``forward`` on the kept units' patches only, then give every unit (kept or not)
    the merged features of the unit representing it (``rep`` ``[total units]``, global indices), so the
    output has the full grid's shape. Qwen3-VL's deepstack features are expanded the same way;
    ``last_hidden_state`` stays the kept patches' (in the tower's window order)."""
    unit = visual.spatial_merge_size ** 2
    given = sorted(set(PRECOMPUTED) & set(kwargs))
    if given:
        raise ValueError(f"tokenreduce static builds the vision tower's {given} itself; do not pass them")
    args = partial_inputs(visual, grid_thw, keep)
    patch_keep = keep.repeat_interleave(unit).to(pixels.device)
    out = forward(pixels[patch_keep], grid_thw=grid_thw, **args, **kwargs)
    rank = keep.long().cumsum(0) - 1
    source = rank[rep].to(out.pooler_output.device)
    out.pooler_output = out.pooler_output[source]
    if getattr(out, "deepstack_features", None) is not None:
        out.deepstack_features = [feat[source.to(feat.device)] for feat in out.deepstack_features]
    return out
