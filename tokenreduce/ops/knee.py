"""Knee (inflection) of descending long-tail curves, one per row, for data-dependent token counts."""

from __future__ import annotations

import torch

RULES = ("kneedle", "slope")


def knee_count(curve: torch.Tensor, n: torch.Tensor, rule: str = "kneedle", slope: float = 1.0) -> torch.Tensor:
    """How many leading points of each row lie before the curve's knee (the knee point itself, the
    first point of the tail, is not counted), ``[G]`` long.

    ``curve`` ``[G, C]`` is sorted in descending order in its first ``n[g]`` entries (the rest is
    ignored). Both rules work on the curve normalised to the unit square (index / (n - 1), value
    scaled to [0, 1]). ``"kneedle"`` (Satopaa et al., 2011): the point farthest below the chord from
    the first point to the last; a curve with no point below it (no long tail) keeps everything.
    ``"slope"``: the first point from which the normalised curve falls more gently than ``slope``
    (1.0 = 45 degrees), the derivative rule of SMS-style pruning. Counts are in ``[1, n]``.
    """
    if rule not in RULES:
        raise ValueError(f"unknown knee rule {rule!r}; available: {', '.join(RULES)}")
    groups, width = curve.shape
    if width == 0:
        return torch.zeros(groups, dtype=torch.long, device=curve.device)
    idx = torch.arange(width, device=curve.device).expand(groups, -1)
    inside = idx < n[:, None]
    y = curve.float()
    top = torch.where(inside, y, float("-inf")).max(dim=1).values
    low = torch.where(inside, y, float("inf")).min(dim=1).values
    yn = (y - low[:, None]) / (top - low).clamp(min=1e-12)[:, None]
    x = idx / (n[:, None] - 1).clamp(min=1)
    if rule == "kneedle":
        gap = torch.where(inside, (1 - x) - yn, float("-inf"))
        best, at = gap.max(dim=1)
        count = torch.where(best > 1e-6, at, n)
    else:
        drop = (yn[:, :-1] - yn[:, 1:]) * (n[:, None] - 1).clamp(min=1)  # -dy/dx between points i, i+1
        gentle = (drop < slope) & inside[:, 1:]
        first = torch.where(gentle, idx[:, :-1], width).min(dim=1).values if width > 1 else n
        count = torch.minimum(torch.as_tensor(first), n)
    return count.clamp(min=1).minimum(n.clamp(min=1)).where(n > 0, 0)
