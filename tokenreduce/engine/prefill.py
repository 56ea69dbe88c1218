"""The state of one prefill: which original tokens the current rows stand for, at which size, and what
every hook derives from them once per reduction (the rows version)."""

from __future__ import annotations

from typing import Any

import torch

from ..layout import PAD, TokenLayout


class ForwardState:
    """The current rows of one prefill: original index (-1 = padding), size, version; ``mrope``: the model's
    positions are M-RoPE's 3-D ones; ``renumbered``: a step asked for contiguous positions (``Selection.renumber``)."""

    def __init__(self, layout: TokenLayout, mrope: bool = False) -> None:
        self.layout = layout
        self.mrope, self.renumbered = mrope, False
        length = layout.shape[1]
        ar = torch.arange(length, device=layout.kind.device).expand(layout.shape[0], -1)
        self.rows = self.owner = torch.where(layout.valid, ar, -1)
        self.size = torch.ones(layout.shape, dtype=torch.float32, device=layout.kind.device)
        self.padded = layout.padded
        self.version = 0
        self._derive()
        self.memo: dict[str, Any] = {}
        self.importance: dict[int, tuple[int, torch.Tensor]] = {}  # query count -> (rows version, scores)
        self.visual_in = layout.visual.sum(dim=1)
        items = [spec for sample in layout.grids for spec in sample]
        self.max_frames = max((spec.frames for spec in items), default=1)
        self.max_cells = max((spec.cells for spec in items), default=1)
        self.max_items = max((len(sample) for sample in layout.grids), default=1)
        self.reducing = bool(items)

    def cached(self, kind: str, obj: Any, make) -> Any:
        """``make(obj)``, computed once per rows version and source object."""
        hit = self.slices.get((kind, id(obj)))
        if hit is not None and hit[0] is obj:
            return hit[1]
        out = make(obj)
        self.slices[(kind, id(obj))] = (obj, out)
        return out

    def set_rows(self, rows: torch.Tensor, size: torch.Tensor, padded: bool, owner: torch.Tensor,
                 renumber: bool = False) -> None:
        """New current rows; ``owner`` ``[B, L_orig]`` is the current row each original token lives in
        (-1: dropped); ``renumber``: from now on the rows take contiguous positions."""
        self.rows, self.size, self.padded, self.owner = rows, size, padded, owner
        self.renumbered = self.renumbered or renumber
        self.version += 1
        self._derive()

    def _derive(self) -> None:
        """What every hook reads about the current rows, computed once per version. ``position_index``:
        the original row whose position each current row takes (``index``, its own, unless renumbered)."""
        self.valid, self.index = self.rows >= 0, self.rows.clamp(min=0)
        self.position_index = renumbered_index(self.rows, self.layout.shape[1]) if self.renumbered else self.index
        self.slices: dict[tuple[str, int], tuple[Any, Any]] = {}

    def current(self, field: str) -> torch.Tensor:
        out = getattr(self.layout, field).gather(1, self.index)
        return torch.where(self.valid, out, PAD if field == "kind" else -1)

    def query_rows(self, n: int) -> torch.Tensor:
        """The last ``n`` valid rows of each sample ``[B, n]`` (the question's tokens)."""
        ar = torch.arange(self.rows.shape[1], device=self.rows.device)
        score = torch.where(self.valid, ar, -1)
        top = score.topk(min(n, score.shape[1]), dim=1).values.sort(dim=1).values
        return torch.where(top >= 0, top, top.max(dim=1, keepdim=True).values).clamp(min=0)


def renumbered_index(rows: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, L]``: the original row whose position each of the current ``rows`` takes when the kept rows are
    renumbered contiguously: the last ``L`` rows of the original ``length``.

    The current rows are right-aligned (every sample's last row is its last prompt token, shorter samples are
    left-padded) and so is the prompt (left padding), so current row ``j`` of a sample with ``n`` kept rows is
    its ``j - (L - n)``-th kept token and takes the position of original row ``length - L + j``: the sample's
    kept tokens get the ``n`` consecutive positions that end at its last prompt token's own. RoPE depends only
    on position differences, so this is exactly the numbering ``0 .. n-1`` within every layer; and a token
    generated next, which the model places at the prompt's original length, sits right after the kept ones
    (at ``n`` in that numbering), in these layers and in the earlier ones, whose rows keep their positions.
    Padding rows take some position too; the mask hides them."""
    current = rows.shape[1]
    return (torch.arange(current, device=rows.device) + (length - current)).expand_as(rows)
