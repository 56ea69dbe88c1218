"""Reductions that run before the LLM with a token count fixed from the retention alone, as a
serving engine needs (vLLM sizes a prompt's placeholders before the vision tower runs). Pure torch
functions on one video's embeddings ``[frames, cells, dim]``, shared by the vLLM plugin
(``integrations/vllm``) and the Hugging Face side, so both keep the same tokens.

- ``evs``: vLLM's EVS rule (:func:`tokenreduce.methods.evs.evs_keep`).
- ``framefusion``: FrameFusion's merge stage alone (Fu et al., 2024, arXiv 2501.01986): each token
  folds, size-weighted, into the token at the same cell of the previous frame. Deviation from the
  paper: with the count fixed in advance there is no similarity threshold and no importance pruning
  (both need the data or the LLM's attention); the ``frames * cells - count`` most similar pairs
  merge, which is what the paper does when merging alone would pass the budget.
- ``aim``: AIM's merging stage (Zhong et al., 2024, arXiv 2412.03248), the same bipartite rounds in
  each frame as tokenreduce's HF ``aim`` (:func:`tokenreduce.methods.aim.aim_groups`), whose count is
  already fixed by the retention; a merged token is its group's mean and keeps its earliest member's
  position. No progressive pruning (it acts inside the LLM).
- ``sms``: Sparsity-Meets-Similarity's first round (arXiv 2409.01162): in each frame, the tokens most
  similar to the frame's mean token (:func:`tokenreduce.methods.sms.sms_similarity`, the HF
  method's reference). Deviation: the paper's count comes from the knee of the similarity curve, which
  needs the data; here each frame keeps ``ceil(cells * retention)`` (at least one). No second round
  (it acts inside the LLM).
"""

from __future__ import annotations

import math

import torch

from ..ops import adjacent_cosine, fold_into_heads, same_cell_predecessor, topk_mask, weighted_merge
from .aim import aim_frame_count, aim_groups
from .base import check_fraction
from .evs import evs_count, evs_keep
from .sms import sms_frame_count, sms_similarity

PRE_LLM_METHODS: tuple[str, ...] = ("evs", "framefusion", "aim", "sms")


def framefusion_count(frames: int, cells: int, retention: float) -> int:
    """Tokens left after merging ``frames`` x ``cells`` tokens: ``ceil(retention * total)`` (as the HF
    budget), at least one frame's worth (first-frame tokens have nothing to merge into)."""
    total = frames * cells
    return min(total, max(cells, math.ceil(total * retention - 1e-9)))


def framefusion_merge(video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep [T, N] bool, merged [T, N, D])``: the ``T*N - framefusion_count`` tokens most similar
    (cosine) to their same-cell predecessor fold into it; chains resolve to the earliest frame (the run
    head, which keeps its position). ``merged`` holds each run head's size-weighted mean."""
    _check(video_embeds, retention)
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


def aim_merge(video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep [T, N] bool, merged [T, N, D])``: AIM's bipartite merging in each frame; each group's
    earliest member is kept and holds the group's mean."""
    _check(video_embeds, retention)
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


def sms_keep(video_embeds: torch.Tensor, retention: float) -> torch.Tensor:
    """``[T, N]`` bool: in each frame the ``sms_frame_count`` tokens most similar to its mean token."""
    _check(video_embeds, retention)
    frames, cells, _ = video_embeds.shape
    ones = torch.ones(frames, cells, device=video_embeds.device)
    sim = sms_similarity(video_embeds, ones.bool(), ones)
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :sms_frame_count(cells, retention)]
    return torch.zeros(frames, cells, dtype=torch.bool, device=video_embeds.device).scatter_(1, order, True)


def video_token_count(method: str, frames: int, cells: int, retention: float) -> int:
    """Tokens ``method`` leaves of a ``frames`` x ``cells`` video (known before the data is seen)."""
    if method == "evs":
        return evs_count(frames, cells, retention)
    if method == "framefusion":
        return framefusion_count(frames, cells, retention)
    if method == "aim":
        return frames * aim_frame_count(cells, retention)
    if method == "sms":
        return frames * sms_frame_count(cells, retention)
    raise ValueError(f"unknown pre-LLM method {method!r}; choose one of {', '.join(PRE_LLM_METHODS)}")


def reduce_video(method: str, video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [K], embeds [K, D])``: the kept tokens' flat indices (ascending, frame-major) and their
    embeddings (merged ones for ``framefusion``), ``K = video_token_count(...)``. No host sync: the
    count is known, so the kept rows are gathered by a stable sort rather than a boolean mask."""
    _check(video_embeds, retention)
    frames, cells, dim = video_embeds.shape
    count = video_token_count(method, frames, cells, retention)
    if method == "evs":
        keep, source = evs_keep(video_embeds, retention), video_embeds
    elif method == "sms":
        keep, source = sms_keep(video_embeds, retention), video_embeds
    elif method == "aim":
        keep, source = aim_merge(video_embeds, retention)
    else:
        keep, source = framefusion_merge(video_embeds, retention)
    index = torch.sort((~keep.flatten()).to(torch.uint8), stable=True).indices[:count]
    return index, source.reshape(frames * cells, dim).index_select(0, index)


def _check(video_embeds: torch.Tensor, retention: float) -> None:
    if video_embeds.dim() != 3:
        raise ValueError(f"expected one video's embeddings [frames, cells, dim], got {tuple(video_embeds.shape)}")
    check_fraction("retention", retention)


__all__ = ["PRE_LLM_METHODS", "aim_merge", "framefusion_count", "framefusion_merge", "reduce_video", "sms_keep",
           "video_token_count"]
