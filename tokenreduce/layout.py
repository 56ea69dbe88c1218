"""TokenLayout: what every position of a multimodal prompt is (text, image or video patch, where)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD, TEXT, IMAGE, VIDEO = -1, 0, 1, 2


@dataclass
class TokenLayout:
    """Per sample and position of a prompt batch ``[B, L]``.

    ``kind`` is PAD / TEXT / IMAGE / VIDEO. ``item`` numbers the images and videos of a sample
    (-1 for text). ``frame`` is the frame (temporal patch) inside the item, -1 for tokens that
    belong to no frame (text, a video's trailing newline token). ``cell`` is the spatial index
    inside the frame (``row * grid_w + col``), -1 where there is none. ``grids`` lists, per
    sample and item, ``(kind, frames, grid_h, grid_w)`` so that pictures can be drawn.
    """

    kind: torch.Tensor
    item: torch.Tensor
    frame: torch.Tensor
    cell: torch.Tensor
    grids: list[list[tuple[int, int, int, int]]] = field(default_factory=list)

    @property
    def visual(self) -> torch.Tensor:
        return self.kind >= IMAGE

    @property
    def valid(self) -> torch.Tensor:
        return self.kind != PAD

    @property
    def shape(self) -> torch.Size:
        return self.kind.shape

    def visual_counts(self) -> torch.Tensor:
        """Visual tokens per sample, ``[B]``."""
        return self.visual.sum(dim=1)

    @classmethod
    def text_only(cls, attention_mask: torch.Tensor) -> TokenLayout:
        kind = torch.where(attention_mask.bool(), TEXT, PAD).to(torch.int8)
        minus = torch.full(kind.shape, -1, dtype=torch.long, device=kind.device)
        return cls(kind=kind, item=minus, frame=minus.clone(), cell=minus.clone(),
                   grids=[[] for _ in range(kind.shape[0])])
