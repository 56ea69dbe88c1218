"""Sparsity Meets Similarity (arXiv 2409.01162): a data-dependent number of visual tokens per image
from the knee of the similarity-to-reference curve, then a second round inside the LLM."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..ops import topk_mask
from ..ops.frames import frame_slots
from ..ops.knee import RULES, knee_count
from .base import Selection, Step, VisualMethod
from .capabilities import PreLLM, check_video
from .options import Choice, Flag, Fraction, Integer, Number, option


def sms_similarity(feats: torch.Tensor, present: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``[G, C]``: cosine similarity of each present token of every group (frame) ``feats`` ``[G, C, D]``
    to the group's reference, its ``size``-weighted mean token (-inf where absent). Shared by the HF
    method and the vLLM path."""
    feats = feats.float()
    weight = (size.float() * present)[..., None]
    reference = (feats * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1e-6)
    sim = F.cosine_similarity(feats, reference[:, None, :], dim=-1)
    return sim.masked_fill(~present, float("-inf"))


def sms_frame_count(cells: int, retention: float) -> int:
    """Tokens a frame of ``cells`` tokens keeps when the count is fixed by ``retention`` (no knee)."""
    return max(1, math.ceil(cells * retention - 1e-9))


def sms_count(frames: int, cells: int, retention: float) -> int:
    """Tokens ``frames`` x ``cells`` tokens keep with the count fixed by ``retention`` (per frame)."""
    return frames * sms_frame_count(cells, retention)


def sms_keep(video_embeds: torch.Tensor, retention: float) -> torch.Tensor:
    """``[T, N]`` bool: the first round before the LLM, in each frame the ``sms_frame_count`` tokens most
    similar to its mean token (:func:`sms_similarity`, the HF method's reference). Deviation: the paper's
    count comes from the knee of the similarity curve, which needs the data; here each frame keeps
    ``ceil(cells * retention)`` (at least one). No second round (it acts inside the LLM)."""
    check_video(video_embeds, retention)
    frames, cells, _ = video_embeds.shape
    ones = torch.ones(frames, cells, device=video_embeds.device)
    sim = sms_similarity(video_embeds, ones.bool(), ones)
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :sms_frame_count(cells, retention)]
    return torch.zeros(frames, cells, dtype=torch.bool, device=video_embeds.device).scatter_(1, order, True)


def sms_select(video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SMS before the LLM (:class:`~.capabilities.PreLLM`): ``(sms_keep(...), video_embeds)``."""
    return sms_keep(video_embeds, retention), video_embeds


@dataclass
class SMS(VisualMethod):
    """Round one, before LLM layer 0, per image or video frame: the cosine similarity of each visual
    token to the frame's reference token is sorted; the knee of that long-tail curve (``knee``
    rule: ``"kneedle"`` or the derivative rule ``"slope"`` with threshold ``slope``) decides how many
    of the most similar tokens the frame keeps, so the count depends on the data; ``retention``
    (None by default) caps it at that fraction of the frame. Round two, before LLM layer
    ``second_layer``: keep ``second_retention`` of the visual tokens round one kept, ranked by the
    attention the last ``last_queries`` rows (the text) pay them (``second_round=False`` skips it).

    Reference token: the paper uses the vision encoder's CLS token. None of the supported towers
    hands one to the LLM (Qwen-VL ViTs and SigLIP have none; LLaVA-NeXT-Video's CLIP CLS is dropped
    by its feature selection), so the reference is the size-weighted mean of the frame's visual
    tokens as they enter the LLM (the documented substitute for CLS-less towers), and similarities
    are taken on those tokens (the tower's output after the projector). Tokens are really removed.
    """

    name: ClassVar[str] = "sms"
    description: ClassVar[str] = "keep visual tokens before the knee of similarity-to-reference, then prune (SMS)"
    stages: ClassVar[tuple[str, ...]] = ("embed", "layer")
    pre_llm: ClassVar[PreLLM] = PreLLM(
        order=3, count=sms_count, select=sms_select, default_retention=0.3,
        note="vLLM runs Sparsity-Meets-Similarity's first round only, with a count fixed from the retention: "
             "the knee needs the data and the second round the LLM's layers")

    retention: float | None = option(None, Fraction(none=True))
    knee: str = option("kneedle", Choice(tuple(RULES)))
    slope: float = option(1.0, Number(0, low_open=True))
    second_round: bool = option(True, Flag())
    second_layer: int = option(2, Integer(1))
    second_retention: float = option(0.5, Fraction())
    last_queries: int = option(1, Integer(1))

    @property
    def n_queries(self) -> int:
        return self.last_queries

    def check_model(self, num_layers: int) -> None:
        super().check_model(num_layers)
        if self.second_round and self.second_layer >= num_layers:
            raise ValueError(f"sms: second_layer={self.second_layer} but the model has {num_layers} LLM layers; "
                             f"choose 1 <= second_layer <= {num_layers - 1} or second_round=False")

    def act_layers(self, num_layers: int) -> set[int]:
        return {0, self.second_layer} if self.second_round else {0}

    def score_layers(self, num_layers: int) -> set[int]:
        return {self.second_layer - 1} if self.second_round else set()

    def reduce(self, step: Step) -> Selection | None:
        if step.layer == 0:
            keep = self.first_round(step)
        else:
            left = step.visual.sum(dim=1)
            target = torch.ceil(left.double() * self.second_retention - 1e-9).long()
            keep = topk_mask(step.importance, step.visual, target)
        return Selection.keep(step.valid & (~step.visual | keep))

    def first_round(self, step: Step) -> torch.Tensor:
        """``[B, L]``: the visual rows each frame keeps before its knee (others False)."""
        member = step.visual & (step.frame >= 0)
        slots = frame_slots(member, step.item, step.frame, step.cell, step.max_items, step.max_frames,
                            step.max_cells)
        sim = sms_similarity(slots.gather(step.hidden), slots.present, slots.gather(step.size))
        n = slots.present.sum(dim=1)
        ordered, order = torch.sort(sim, dim=1, descending=True, stable=True)
        count = knee_count(ordered, n, self.knee, self.slope)
        if self.retention is not None:
            count = torch.minimum(count, torch.ceil(n.double() * self.retention - 1e-9).long().clamp(min=1))
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order))
        keep_slot = slots.present & (rank < count[:, None])
        step.memo["first_counts"] = count
        return slots.scatter(keep_slot.long(), fill=0).bool() & member | (step.visual & (step.frame < 0))
