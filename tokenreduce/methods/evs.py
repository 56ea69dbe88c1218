"""EVS, Efficient Video Sampling (the rule vLLM ships as ``--video-pruning-rate``; Bagrov et al., 2025):
drop the video tokens that barely changed since the previous frame, before the LLM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..layout import VIDEO
from ..ops import adjacent_cosine, same_cell_predecessor
from ..ops.rank import group_count, group_rank
from .base import Selection, Step, VisualMethod, check_fraction
from .capabilities import PreLLM
from .options import Fraction, option


def evs_count(frames: int, cells: int, retention: float) -> int:
    """Video tokens EVS keeps for ``frames`` x ``cells`` tokens, fixed before any data is seen (vLLM:
    ``max(cells, int(frames * cells * (1 - rate)))``, with ``rate = 1 - retention``)."""
    return max(cells, int(frames * cells * retention))


def evs_scores(hidden: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[B, L]`` dissimilarity (1 - cosine, float32) of each row to the same cell of the previous
    frame of its video; ``inf`` for first-frame rows. ``group`` holds (video, cell) ids, -1 elsewhere."""
    pred = same_cell_predecessor(group, num_groups)
    score = 1 - adjacent_cosine(hidden, pred)  # no predecessor: 1 - (-inf) = inf, always kept
    return torch.where(group >= 0, score, float("-inf"))


def evs_keep(video_embeds: torch.Tensor, retention: float) -> torch.Tensor:
    """``[T, N]`` bool: the tokens EVS keeps of one video's embeddings ``[T, N, D]`` (frames x cells).
    The same computation as the ``evs`` method inside ``tokenreduce.patch`` (so a server and the
    Hugging Face path keep the same tokens)."""
    if video_embeds.dim() != 3:
        raise ValueError(f"evs_keep expects video embeddings [frames, cells, dim], got shape "
                         f"{tuple(video_embeds.shape)}")
    check_fraction("retention", retention)
    frames, cells, dim = video_embeds.shape
    group = torch.arange(cells, device=video_embeds.device).repeat(frames)[None]
    scores = evs_scores(video_embeds.reshape(1, frames * cells, dim), group, cells)
    rank = group_rank(scores, torch.zeros_like(group))
    return (rank < evs_count(frames, cells, retention)).view(frames, cells)


def evs_select(video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """EVS before the LLM (:class:`~.capabilities.PreLLM`): ``(evs_keep(...), video_embeds)``."""
    return evs_keep(video_embeds, retention), video_embeds


@dataclass
class EVS(VisualMethod):
    """Before LLM layer 0, score every video token by its dissimilarity (1 - cosine) to the token at
    the same spatial cell of the previous frame (temporal patch), keep every first-frame token, and
    keep the ``evs_count`` most dissimilar tokens of each video: a count fixed from ``retention``
    alone, as vLLM's EVS fixes its placeholder count before seeing the data. Kept tokens keep their
    original positions (vLLM recomputes M-RoPE positions for the same effect). Images pass through.

    Same rule and count as vLLM's implementation; here the dropped tokens are really removed from the
    LLM's sequence and batches of any size are supported. Deviation: the scores are float32 (see
    :func:`evs_scores`) where vLLM scores in the embeddings' dtype, bf16 on GPU; on bf16 embeddings bf16
    rounding ties and reorders scores there, so the kept sets differ (identical on float32 embeddings).
    """

    name: ClassVar[str] = "evs"
    description: ClassVar[str] = "drop video tokens similar to the previous frame before the LLM (vLLM EVS baseline)"
    stages: ClassVar[tuple[str, ...]] = ("embed",)
    pre_llm: ClassVar[PreLLM] = PreLLM(order=0, count=evs_count, select=evs_select, default_retention=0.3)

    retention: float = option(0.3, Fraction())

    def act_layers(self, num_layers: int) -> set[int]:
        return {0}

    def reduce(self, step: Step) -> Selection | None:
        if self.retention >= 1:
            return None
        video = step.valid & (step.kind == VIDEO) & (step.frame >= 0)
        span = step.max_cells
        group = torch.where(video, step.item * span + step.cell, -1)
        scores = evs_scores(step.hidden, group, step.max_items * span)
        item = torch.where(video, step.item, -1)
        total = group_count(video, item, step.max_items)
        first = group_count(video & (step.frame == 0), item, step.max_items)  # cells per frame
        keep_n = torch.maximum(first, (total.double() * self.retention).floor().long())  # as evs_count
        rank = group_rank(scores, item)
        keep = rank < keep_n.gather(1, item.clamp(min=0))
        return Selection.keep(step.valid & (~video | keep))

