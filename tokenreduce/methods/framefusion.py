"""FrameFusion (Fu et al., 2024, arXiv 2501.01986): similarity merging of adjacent frames, then
importance pruning, inside the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..ops import adjacent_cosine, fold_into_heads, same_cell_predecessor, topk_mask, weighted_merge
from ..ops.similarity import similar_predecessors
from .base import Selection, Step, VisualMethod, budget
from .capabilities import PreLLM, check_video
from .options import Choice, Fraction, Integer, Number, option


def framefusion_count(frames: int, cells: int, retention: float) -> int:
    """Tokens left after merging ``frames`` x ``cells`` tokens: ``ceil(retention * total)`` (as the HF
    budget), at least one frame's worth (first-frame tokens have nothing to merge into)."""
    total = frames * cells
    return min(total, max(cells, math.ceil(total * retention - 1e-9)))


def framefusion_merge(video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FrameFusion's merge stage alone, before the LLM (:class:`~.capabilities.PreLLM`): ``(keep [T, N]
    bool, merged [T, N, D])``. The ``T*N - framefusion_count`` tokens most similar (cosine) to their
    same-cell predecessor fold into it; chains resolve to the earliest frame (the run head, which keeps
    its position); ``merged`` holds each run head's size-weighted mean.

    Deviation from the paper: with the count fixed in advance there is no similarity threshold and no
    importance pruning (both need the data or the LLM's attention); the most similar pairs merge, which
    is what the paper does when merging alone would pass the budget."""
    check_video(video_embeds, retention)
    frames, cells, dim = video_embeds.shape
    flat = video_embeds.reshape(1, frames * cells, dim)
    group = torch.arange(cells, device=flat.device).repeat(frames)[None]
    pred = same_cell_predecessor(group, cells)
    sim = adjacent_cosine(flat, pred)
    n_merge = frames * cells - framefusion_count(frames, cells, retention)
    merge = topk_mask(sim, pred >= 0, torch.tensor([n_merge], device=flat.device))
    dest = fold_into_heads(pred, merge, frames)
    merged, _ = weighted_merge(flat, torch.ones(1, frames * cells, device=flat.device), dest)
    keep = dest == torch.arange(frames * cells, device=flat.device)
    return keep.view(frames, cells), merged.view(frames, cells, dim)


@dataclass
class FrameFusion(VisualMethod):
    """Merge each video token into the token at the same spatial cell of the previous frame when
    their hidden states' cosine similarity is at least ``similarity_threshold``; do it before
    LLM layer 0 (on the embeddings) and again before each following layer, cascading, until the
    fraction of mergeable visual tokens falls under ``ratio_lower_bound`` (or ``merge_layers``
    layers have merged). Then prune once, by the attention the last ``last_queries`` rows paid
    in the layer just run, down to the budget. If merging alone would pass the budget, only the
    most similar pairs are merged and pruning is skipped (as the paper does).

    Budget: ``retention`` (fraction of visual tokens kept after merging and pruning, default
    0.3), or the paper's ``cost`` (visual rows summed over all layers, relative to dense; the
    budget is recomputed from the model's real depth, where the official code assumes 28 layers).
    ``similarity_lower_bound`` is the paper's name for ``similarity_threshold``.

    Deviations from the official code, all deliberate: a merged token is the size-weighted mean
    of its members and sizes carry over across layers (``merge="weighted"``, the default; official:
    unweighted, sizes forgotten, so a token that already absorbed ten frames counts as one);
    merging acts between layers rather than between a layer's attention and its MLP; batches of
    any size (official: batch 1); images (a single frame) are only pruned.

    ``merge="official"`` reproduces the official mean: a run is folded into its first token as the
    plain mean of the hidden states being merged (the head and each member counted once), whatever
    earlier layers merged into them. Sizes are still counted (``Step.size``: the original tokens a row
    stands for), so a method composed after this one sees the same sizes under both settings and the
    switch isolates this method's means; no other part of the engine reads sizes (there is no
    proportional attention in the LLM; Qwen3-VL's deepstack features, which the official code predates,
    are still added to a merged row as the mean over its original tokens).
    """

    name: ClassVar[str] = "framefusion"
    description: ClassVar[str] = "merge similar tokens of adjacent frames, then prune by importance (FrameFusion)"
    stages: ClassVar[tuple[str, ...]] = ("embed", "layer")
    pre_llm: ClassVar[PreLLM] = PreLLM(
        order=1, count=framefusion_count, select=framefusion_merge, default_retention=0.3,
        note="vLLM runs FrameFusion's merge stage only, with a token count fixed from the retention: its "
             "similarity threshold, cost budget and importance pruning need the data or the LLM's layers")

    retention: float | None = option(None, Fraction(none=True))
    cost: float | None = option(None, Fraction(none=True))
    similarity_threshold: float | None = option(None, Number(-1, 1, none=True))
    similarity_lower_bound: float | None = option(None, Number(-1, 1, none=True))
    ratio_lower_bound: float = option(0.1, Number(0, 1))
    merge_layers: int = option(3, Integer(1))
    last_queries: int = option(4, Integer(1))
    merge: str = option("weighted", Choice(("weighted", "official")))

    def validate(self) -> None:
        if self.retention is not None and self.cost is not None:
            raise ValueError("framefusion: give either retention or cost, not both")
        if self.retention is None and self.cost is None:
            self.retention = 0.3
        if self.similarity_lower_bound is not None:
            if self.similarity_threshold not in (None, self.similarity_lower_bound):
                raise ValueError("framefusion: similarity_lower_bound is an alias of similarity_threshold; "
                                 "give one of them")
            self.similarity_threshold = self.similarity_lower_bound
        if self.similarity_threshold is None:
            self.similarity_threshold = 0.6

    @property
    def n_queries(self) -> int:
        return self.last_queries

    def check_model(self, num_layers: int) -> None:
        super().check_model(num_layers)
        if self.merge_layers >= num_layers:
            raise ValueError(f"framefusion: merge_layers={self.merge_layers} but the model has {num_layers} "
                             f"LLM layers; pruning needs a layer after merging (merge_layers <= {num_layers - 1})")

    def act_layers(self, num_layers: int) -> set[int]:
        return set(range(self.merge_layers + 1))

    def score_layers(self, num_layers: int) -> set[int]:
        return set(range(self.merge_layers))

    def _target(self, step: Step, n_visual: torch.Tensor) -> torch.Tensor:
        """Visual rows each sample may keep from this layer on."""
        if self.retention is not None:
            return budget(self.retention, step.visual_in)
        total = self.cost * step.num_layers * step.visual_in.double()
        left = (total - step.memo["used"]) / (step.num_layers - step.layer)
        return torch.minimum(left.floor().long().clamp(min=0), n_visual)

    def reduce(self, step: Step) -> Selection | None:
        memo, visual = step.memo, step.visual
        if not memo:
            memo.update(active=step.visual_in > 0, pending=torch.zeros_like(step.visual_in, dtype=torch.bool),
                        used=torch.zeros_like(step.visual_in, dtype=torch.float64))
        rows = step.row_index()
        n_visual = visual.sum(dim=1)
        target = self._target(step, n_visual)
        dest = rows
        # both branches run masked by sample (no host sync): a sample is pruning or merging or done
        if step.layer > 0:  # prune samples whose merging stopped in the previous layer
            pending = visual & memo["pending"][:, None]
            keep = topk_mask(step.importance, pending, target)
            dest = torch.where(pending & ~keep, -1, dest)
            memo["pending"] = torch.zeros_like(memo["pending"])
        if step.layer < self.merge_layers:
            merge, fold = self._merge(step, target, n_visual)
            dest = torch.where(merge, fold, dest)
        if self.cost is not None:  # visual rows this layer will process count against the budget
            memo["used"] = memo["used"] + ((dest == rows) & visual).sum(dim=1)
        # merge="official": every row counts once in its run's mean (the official unweighted mean)
        return Selection(dest, weight=torch.ones_like(step.size) if self.merge == "official" else None)

    def _merge(self, step: Step, target: torch.Tensor, n_visual: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's merges: which rows fold away, and the run head each row folds into."""
        memo = step.memo
        active = memo["active"]
        span = step.max_cells
        candidate = step.visual & (step.frame >= 0) & active[:, None]
        group = torch.where(candidate, step.item * span + step.cell, -1)
        pred = same_cell_predecessor(group, step.max_items * span)
        sim, mergeable = similar_predecessors(step.hidden, pred, candidate, self.similarity_threshold)
        n_merge = mergeable.sum(dim=1)
        stop = active & (n_merge < self.ratio_lower_bound * n_visual.clamp(min=1))
        go = active & ~stop
        allowed = torch.where(go, (n_visual - target).clamp(min=0), 0)
        merge = topk_mask(sim, mergeable, allowed)
        left = n_visual - merge.sum(dim=1)
        memo["active"] = go & (n_merge < allowed) & (step.layer + 1 < self.merge_layers)
        memo["pending"] = (stop | (go & ~memo["active"] & (n_merge < allowed))) & (left > target)
        return merge, fold_into_heads(pred, merge, step.max_frames)
