"""AIM (Zhong et al., 2024, arXiv 2412.03248): adaptive inference of multimodal LLMs by token
merging before the LLM and progressive pruning inside it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..ops import topk_mask
from ..ops.frames import frame_slots
from .base import Selection, Step, VisualMethod
from .capabilities import PreLLM, check_video
from .options import Choice, Flag, Fraction, Integer, Layer, option


def aim_rounds(retention: float, rounds: int | None = None) -> int:
    """Merging rounds: ``rounds`` if given, else enough halvings to reach ``retention``, plus one."""
    return rounds or max(1, math.ceil(math.log2(1 / retention)) + 1)


def aim_frame_count(cells: int, retention: float, rounds: int | None = None, official: bool = False) -> int:
    """Tokens AIM's merging leaves of a frame of ``cells`` tokens (known before the data is seen); see
    :func:`aim_groups` for ``official``."""
    n, target = cells, math.ceil(cells * retention - 1e-9)
    for k in range(aim_rounds(retention, rounds)):
        if rounds is None:
            want = max(n - target, 0)
        else:
            want = cells // 2 ** (k + 1) if official else n // 2
        n -= min(want, n // 2 if official else (n + 1) // 2)
    return n


class AimGroups(NamedTuple):
    """AIM's merging of each group: ``rep`` ``[G, C]`` long, each slot's representative slot; ``weight``
    ``[G, C]`` float, each slot's weight in its representative's mean (its size when the merging is
    size-weighted; with ``weighted=False`` the share the nested unweighted means give it: 1/2 for each of
    two tokens merged in one round, 1/4 for a token whose pair is merged with another token in the next)."""

    rep: torch.Tensor
    weight: torch.Tensor


def aim_groups(feats: torch.Tensor, present: torch.Tensor, size: torch.Tensor, retention: float,
               rounds: int | None = None, official: bool = False) -> torch.Tensor:
    """``[G, C]`` long: each slot's representative slot after AIM's bipartite merging of every group
    (frame) ``feats`` ``[G, C, D]`` (``present`` slots, token ``size`` weights): per round, the present
    tokens alternate into sets A and B, each A token matches its most similar B token (cosine), and the
    best-matched A tokens merge into their match (size-weighted), until each group keeps ``retention``
    of its tokens or for exactly ``rounds`` halving rounds. Shared by the HF method and the vLLM path.

    A round merges up to every A token (``ceil(n / 2)``), and with ``rounds`` half of the current count;
    ``official``: the official code's counts instead, at most ``floor(n / 2)`` per round and, with
    ``rounds``, ``N // 2``, ``N // 4``, ... of the group's original count ``N`` (its two rounds keep
    ``N - N // 2 - N // 4`` of an 11-token frame: 4, where the default keeps 3). :func:`aim_grouping`
    also gives each slot's weight, and merges unweighted on request."""
    return aim_grouping(feats, present, size, retention, rounds, official).rep


def aim_grouping(feats: torch.Tensor, present: torch.Tensor, size: torch.Tensor, retention: float,
                 rounds: int | None = None, official: bool = False, weighted: bool = True) -> AimGroups:
    """:func:`aim_groups` with each slot's weight in its group's mean. ``weighted=False``: the official
    code's unweighted means, each round's merged token the plain mean of the current tokens merging (the B
    token and the A tokens matched to it, each counted once, however many tokens earlier rounds merged into
    them); later rounds' similarities are taken on those means."""
    dtype = feats.dtype
    present = present.clone()
    original = present.sum(dim=1)
    feats = feats.float()
    size = size.float() * present
    weight = size.clone() if weighted else present.float()
    target = torch.ceil(present.sum(dim=1).double() * retention - 1e-9).long()
    cells = torch.arange(present.shape[1], device=present.device).expand_as(present)
    rep = cells.clone()  # each slot's current representative slot
    for k in range(aim_rounds(retention, rounds)):  # a bounded count known on the host (no data-dependent loop)
        n = present.sum(dim=1)
        order = present.long().cumsum(dim=1) - 1
        a_set, b_set = present & (order % 2 == 0), present & (order % 2 == 1)
        unit = F.normalize(feats, dim=-1).to(dtype)  # bf16 matmul on GPU: tensor cores
        sim = (unit @ unit.transpose(1, 2)).float()
        sim = sim.masked_fill(~b_set[:, None, :], float("-inf"))
        best, match = sim.max(dim=2)
        best = best.masked_fill(~a_set, float("-inf"))
        if rounds is None:
            r = (n - target).clamp(min=0)
        else:
            r = original // 2 ** (k + 1) if official else n // 2
        r = torch.minimum(r, n // 2 if official else a_set.sum(dim=1))
        merged = topk_mask(best, a_set, r)
        # means of B tokens and the A tokens merging into them: size-weighted, or each token counted once
        into = torch.where(merged, match, cells)
        w = size if weighted else present.float()
        total = torch.zeros_like(feats).scatter_add_(1, into[..., None].expand_as(feats), w[..., None] * feats)
        new_w = torch.zeros_like(w).scatter_add_(1, into, w)
        feats = torch.where((new_w > 0)[..., None], total / new_w.clamp(min=1e-6)[..., None], feats)
        if weighted:
            size = torch.where(merged, 0.0, new_w)
        else:  # each token's share of its new mean, passed down to the slots it stands for
            weight = weight * (w / new_w.gather(1, into).clamp(min=1e-6)).gather(1, rep)
        present = present & ~merged
        rep = into.gather(1, rep)
    return AimGroups(rep, weight)


def aim_count(frames: int, cells: int, retention: float) -> int:
    """Tokens AIM's merging leaves of ``frames`` x ``cells`` tokens (each frame merges alone)."""
    return frames * aim_frame_count(cells, retention)


def aim_merge(video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """AIM's merging stage before the LLM (:class:`~.capabilities.PreLLM`): ``(keep [T, N] bool,
    merged [T, N, D])``, the same bipartite rounds in each frame as the HF method (:func:`aim_groups`,
    whose count is already fixed by the retention); each group's earliest member is kept, holds the
    group's mean and keeps its position. No progressive pruning (it acts inside the LLM)."""
    check_video(video_embeds, retention)
    frames, cells, dim = video_embeds.shape
    ones = torch.ones(frames, cells, device=video_embeds.device)
    rep = aim_groups(video_embeds, ones.bool(), ones, retention)
    slot = torch.arange(cells, device=video_embeds.device).expand(frames, cells)
    first = torch.full_like(slot, cells).scatter_reduce_(1, rep, slot, reduce="amin").gather(1, rep)
    total = torch.zeros_like(video_embeds, dtype=torch.float32).scatter_add_(
        1, first[..., None].expand(-1, -1, dim), video_embeds.float())
    count = torch.zeros(frames, cells, device=video_embeds.device).scatter_add_(1, first, ones)
    merged = (total / count.clamp(min=1)[..., None]).to(video_embeds.dtype)
    return first == slot, merged


@dataclass
class AIM(VisualMethod):
    """Before LLM layer 0, iterative bipartite merging inside each frame or image: its tokens are
    split alternately into sets A and B, each A token is matched to its most similar B token
    (cosine of the embeddings), and the best-matched A tokens merge into their match; rounds
    repeat (each can at most halve a frame) until each frame keeps ``retention`` of its tokens,
    or for exactly ``rounds`` halving rounds (the paper: two, r = N/2 then N/4, keeping 25%).
    Inside the LLM, progressive pruning: all visual tokens up to layer ``prune_start`` (default
    half the depth, the paper's 14 of 28), then before each following layer an equal share more
    is dropped, by the attention the last ``last_queries`` rows pay, until none remain after
    layer ``prune_end`` (default three quarters of the depth, the paper's 21 of 28).

    Deviations from the official code: merging is size-weighted and sizes are carried into the
    LLM (official: unweighted mean); a merged token keeps its earliest member's original position
    (official: Qwen2-VL's grid is shrunk and positions rebuilt); pruning really removes tokens
    (official: attention masking, no compute saved) and ranks them by the last rows' attention
    from SDPA-compatible q.K (official: a PageRank-like score over eager attention). Merging rounds: a
    round here may merge every A token (``ceil(n / 2)`` of an odd ``n``; official: at most ``floor(n / 2)``),
    with ``rounds`` it merges ``n // 2`` of the current count (official: ``N // 2`` then ``N // 4`` of the
    original), so odd frames keep fewer tokens (7 tokens at retention 0.25: 2 here, 3 there); and tokens keep
    their spatial order between rounds (official: ``[unmerged A, B]``, so its later rounds pair different
    tokens). ``rounding="official"`` merges the official counts (with ``rounds=2``, the official code's
    count for every frame size; see :func:`aim_groups`); the order between rounds stays ours. See
    docs/methods.md.

    ``merge="official"`` reproduces the official unweighted mean (the default, ``"weighted"``, is ours):
    each round's merged token is the plain mean of the current tokens merging, each counted once however
    many earlier rounds merged into it, so a token merged in the first round weighs half of one merged in
    the second; later rounds' similarities are taken on those means (:func:`aim_grouping`). Sizes are
    still counted (``Step.size``), so a method composed after this one sees the same sizes under both
    settings; no other part of the engine reads them (no proportional attention in the LLM), so the switch
    changes exactly the merged means (and, through them, later rounds' matches). The vLLM path (merging
    only, before the LLM) has no such option.
    """

    name: ClassVar[str] = "aim"
    description: ClassVar[str] = "bipartite merging in each frame before the LLM, then progressive pruning (AIM)"
    stages: ClassVar[tuple[str, ...]] = ("embed", "layer")
    pre_llm: ClassVar[PreLLM] = PreLLM(
        order=2, count=aim_count, select=aim_merge, default_retention=0.25,
        note="vLLM runs AIM's merging only: its progressive pruning acts inside the LLM's layers")

    retention: float = option(0.25, Fraction())
    rounds: int | None = option(None, Integer(1, none=True))
    prune: bool = option(True, Flag())
    prune_start: int | None = option(None, Layer(none=True, room=1))
    prune_end: int | None = option(None, Layer(none=True, room=1))
    last_queries: int = option(8, Integer(1))
    rounding: str = option("ceil", Choice(("ceil", "official")))
    merge: str = option("weighted", Choice(("weighted", "official")))

    def validate(self) -> None:
        if None not in (self.prune_start, self.prune_end) and self.prune_end < self.prune_start:
            raise ValueError(f"aim: prune_end={self.prune_end} is before prune_start={self.prune_start}")

    @property
    def n_queries(self) -> int:
        return self.last_queries

    def schedule(self, num_layers: int) -> tuple[int, int]:
        """(start, end): pruning drops visual tokens before layers start+1 .. end+1."""
        start = num_layers // 2 if self.prune_start is None else self.prune_start
        # the default end leaves at least one layer after the last drop (shallow models)
        end = min((3 * num_layers) // 4, num_layers - 2) if self.prune_end is None else self.prune_end
        return start, max(start, end)

    def check_model(self, num_layers: int) -> None:
        super().check_model(num_layers)
        start, end = self.schedule(num_layers)
        if self.prune and end + 1 >= num_layers:
            raise ValueError(f"aim: the pruning schedule {start}..{end} needs layers after it, but the model has "
                             f"{num_layers} LLM layers; choose prune_end <= {num_layers - 2} or prune=False")

    def prune_layers(self, num_layers: int) -> range:
        start, end = self.schedule(num_layers)
        return range(start + 1, end + 2) if self.prune else range(0)

    def act_layers(self, num_layers: int) -> set[int]:
        return {0, *self.prune_layers(num_layers)}

    def score_layers(self, num_layers: int) -> set[int]:
        return {layer - 1 for layer in self.prune_layers(num_layers)}

    def reduce(self, step: Step) -> Selection | None:
        if step.layer == 0:
            return self._merge(step)
        start, end = self.schedule(step.num_layers)
        if "base" not in step.memo:  # visual tokens each sample had when pruning began
            step.memo["base"] = step.visual.sum(dim=1)
        left = 1 - (step.layer - start) / (end + 1 - start)
        target = torch.ceil(step.memo["base"].double() * left - 1e-9).long().clamp(min=0)
        keep = topk_mask(step.importance, step.visual, target)
        return Selection.keep(step.valid & (~step.visual | keep))

    def _merge(self, step: Step) -> Selection | None:
        if self.retention >= 1 and self.rounds is None:
            return None
        member = step.visual & (step.frame >= 0)
        slots = frame_slots(member, step.item, step.frame, step.cell, step.max_items, step.max_frames,
                            step.max_cells)
        official = self.merge == "official"
        rep, weight = aim_grouping(slots.gather(step.hidden), slots.present, slots.gather(step.size), self.retention,
                                   self.rounds, official=self.rounding == "official", weighted=not official)
        # the surviving row of each group of merged tokens is its earliest member (original position)
        row = slots.flat % step.rows.shape[1]
        first = torch.full_like(row, step.rows.shape[1]).scatter_reduce_(
            1, rep, torch.where(slots.present, row, step.rows.shape[1]), reduce="amin")
        dest = slots.scatter(first.gather(1, rep))
        # merge="official": each row weighs its share of the nested unweighted means (other rows: 1)
        return Selection(torch.where(member, dest, step.row_index()),
                         weight=slots.scatter(weight, fill=1.0) if official else None)
