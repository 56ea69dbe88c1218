"""TokenLayout: what every position of a multimodal prompt is (text, image or video patch, where)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

T = TypeVar("T")

PAD, TEXT, IMAGE, VIDEO = -1, 0, 1, 2


@dataclass(frozen=True)
class ItemSpec:
    """One image or video as the LLM sees it: ``frames`` x ``grid_h`` x ``grid_w`` tokens plus
    ``extra`` trailing tokens that belong to no frame (LLaVA-OneVision's video newline), spread
    over ``runs`` consecutive runs of placeholder tokens (Qwen3-VL: one run per frame, with a
    timestamp between frames; everyone else: one run)."""

    kind: int
    frames: int
    grid_h: int
    grid_w: int
    extra: int = 0
    runs: int = 1

    @property
    def cells(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def num_tokens(self) -> int:
        return self.frames * self.cells + self.extra


@dataclass
class TokenLayout:
    """Per sample and position of a prompt batch ``[B, L]``.

    ``kind`` is PAD / TEXT / IMAGE / VIDEO. ``item`` numbers the images and videos of a sample
    (-1 for text). ``frame`` is the frame (temporal patch) inside the item, -1 for tokens that
    belong to no frame (text, a video's trailing newline token). ``cell`` is the spatial index
    inside the frame (``row * grid_w + col``), -1 where there is none. ``grids`` lists, per
    sample, the :class:`ItemSpec` of each item; ``padded`` says whether any position is padding and
    ``right_padded`` whether some sample has padding after one of its tokens (right padding, or a hole)
    (both known on the host, so the engine never has to ask the device).
    """

    kind: torch.Tensor
    item: torch.Tensor
    frame: torch.Tensor
    cell: torch.Tensor
    grids: list[list[ItemSpec]] = field(default_factory=list)
    padded: bool = False
    right_padded: bool = False

    @property
    def visual(self) -> torch.Tensor:
        return self.kind >= IMAGE

    @property
    def valid(self) -> torch.Tensor:
        return self.kind != PAD

    @property
    def shape(self) -> torch.Size:
        return self.kind.shape

    @classmethod
    def text_only(cls, valid: torch.Tensor) -> TokenLayout:
        """All text (``valid`` ``[B, L]`` bool, False = padding); adapters then fill in visual runs."""
        kind = torch.where(valid, TEXT, PAD).to(torch.int8)
        minus = torch.full(kind.shape, -1, dtype=torch.long, device=kind.device)
        return cls(kind=kind, item=minus, frame=minus.clone(), cell=minus.clone(),
                   grids=[[] for _ in range(kind.shape[0])], padded=not bool(valid.all()),
                   right_padded=bool((valid[:, :-1] & ~valid[:, 1:]).any()))

    def to(self, device: torch.device) -> TokenLayout:
        return TokenLayout(kind=self.kind.to(device), item=self.item.to(device), frame=self.frame.to(device),
                           cell=self.cell.to(device), grids=self.grids, padded=self.padded,
                           right_padded=self.right_padded)


def per_sample(samples: int, repeat: int, describe: Callable[[int], T]) -> list[T]:
    """Per batch sample, ``describe(b)`` for the first of every ``repeat`` consecutive samples and the same
    value for its copies: ``generate`` repeats each sample ``repeat`` times (beams, ``num_return_sequences``)
    after the pixel inputs that describe it once were encoded. ``describe`` runs in batch order."""
    out: list[T] = []
    for b in range(samples):
        out.append(out[-1] if b % repeat else describe(b))
    return out
