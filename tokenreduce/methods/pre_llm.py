"""Reductions that run before the LLM with a token count fixed from the retention alone, as a
serving engine needs (vLLM sizes a prompt's placeholders before the vision tower runs). Shared by the
vLLM plugin (``integrations/vllm``) and the Hugging Face side, so both keep the same tokens.

The methods are those whose class declares a :class:`~.capabilities.PreLLM` capability (today ``evs``,
``framefusion``, ``aim`` and ``sms``); each method's file holds its count rule and selection, with what
the pre-LLM form leaves out of the paper. Nothing here names a method.
"""

from __future__ import annotations

import torch

from .base import REGISTRY
from .capabilities import PreLLM, check_video, pre_llm_of


def pre_llm_methods() -> tuple[str, ...]:
    """Names of the registered methods that run before the LLM, in their declared ``PreLLM.order``."""
    specs = {name: spec for name, cls in REGISTRY.items() if (spec := pre_llm_of(cls)) is not None}
    return tuple(sorted(specs, key=lambda name: specs[name].order))


def pre_llm_spec(method: str) -> PreLLM:
    """The :class:`PreLLM` capability of ``method``; ValueError naming the pre-LLM methods otherwise."""
    spec = pre_llm_of(REGISTRY[method]) if method in REGISTRY else None
    if spec is None:
        raise ValueError(f"unknown pre-LLM method {method!r}; choose one of {', '.join(pre_llm_methods())}")
    return spec


def video_token_count(method: str, frames: int, cells: int, retention: float) -> int:
    """Tokens ``method`` leaves of a ``frames`` x ``cells`` video (known before the data is seen)."""
    return pre_llm_spec(method).count(frames, cells, retention)


def reduce_video(method: str, video_embeds: torch.Tensor, retention: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [K], embeds [K, D])``: the kept tokens' flat indices (ascending, frame-major) and their
    embeddings (merged ones for a merging method), ``K = video_token_count(...)``. No host sync: the
    count is known, so the kept rows are gathered by a stable sort rather than a boolean mask."""
    check_video(video_embeds, retention)
    spec = pre_llm_spec(method)
    frames, cells, dim = video_embeds.shape
    count = spec.count(frames, cells, retention)
    keep, source = spec.select(video_embeds, retention)
    index = torch.sort((~keep.flatten()).to(torch.uint8), stable=True).indices[:count]
    return index, source.reshape(frames * cells, dim).index_select(0, index)


__all__ = ["pre_llm_methods", "pre_llm_spec", "reduce_video", "video_token_count"]
