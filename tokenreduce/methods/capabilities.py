"""Capabilities a method class declares beside its options. Every list that serves a capability (the
vLLM plugin's methods, their default retentions and messages, :mod:`tokenreduce.methods.pre_llm`) is
built from ``REGISTRY`` filtered by it, so a new method gains the capability by declaring it on its class
and no list elsewhere has to be edited."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .base import check_fraction


@dataclass(frozen=True)
class PreLLM:
    """The method can run before the LLM on one video's embeddings ``[frames, cells, dim]`` with a token
    count fixed from the retention alone, as a serving engine needs (vLLM sizes a prompt's placeholders
    before the vision tower runs). Declared as ``pre_llm: ClassVar[PreLLM] = PreLLM(...)`` on the class.

    - ``order``: the method's rank among the pre-LLM methods: the order of every list shown to users and
      the method's index in the vLLM plugin's per-video settings tensor (distinct per method).
    - ``count(frames, cells, retention)``: the tokens kept, known before any data is seen.
    - ``select(video_embeds, retention)``: ``(keep [T, N] bool, embeds [T, N, D])``, exactly ``count``
      tokens kept and the embeddings they carry (a merging method's merged means, the input otherwise).
    - ``default_retention``: the retention a server applies when none is given.
    - ``note``: what the pre-LLM form leaves out of the method (said when an option needing the LLM's
      layers or the data is given to the vLLM plugin); empty when nothing is left out.
    """

    order: int
    count: Callable[[int, int, float], int]
    select: Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]
    default_retention: float
    note: str = ""


def pre_llm_of(cls: type) -> PreLLM | None:
    """The :class:`PreLLM` capability a method class declares (``pre_llm``), or None."""
    spec = getattr(cls, "pre_llm", None)
    if spec is not None and not isinstance(spec, PreLLM):
        raise TypeError(f"{cls.__name__}.pre_llm must be a tokenreduce.methods.capabilities.PreLLM, "
                        f"got {type(spec).__name__}")
    return spec


def check_video(video_embeds: torch.Tensor, retention: float) -> None:
    """The input rule of every pre-LLM selection: one video's embeddings ``[frames, cells, dim]`` and a
    retention in (0, 1]."""
    if video_embeds.dim() != 3:
        raise ValueError(f"expected one video's embeddings [frames, cells, dim], got {tuple(video_embeds.shape)}")
    check_fraction("retention", retention)


__all__ = ["PreLLM", "check_video", "pre_llm_of"]
