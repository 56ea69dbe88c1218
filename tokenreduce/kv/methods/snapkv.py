"""SnapKV (Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

After a dense prefill, the last ``window`` queries (the observation window) score every earlier key
by their softmax attention (float32, causal inside the window, the model's own attention scaling),
summed over the window and over the query heads of each KV head; scores are average-pooled along the
sequence (``kernel``) so neighbours of important tokens survive; each KV head keeps its top entries
plus the window, ``retention`` of the prompt in all (``ceil``, at least the window). Scores come from a
small ``window x L`` product per head (never the ``L x L`` attention), so the model keeps SDPA.

How this differs from the official code (FasterDecoding/SnapKV, ``snapkv_utils.py``), on purpose:

- **GQA: selection per KV head.** The official code repeats K/V to every query head before selecting,
  so each query head keeps its own entries and the compressed cache holds ``num_attention_heads``
  heads: ``num_attention_heads / num_key_value_heads`` times the memory of a KV-head cache at the same
  count. Here each KV head keeps one set, scored by the sum over its query group (the same ranking as
  kvpress's mean), so the cache stays at ``num_key_value_heads`` heads. Not offered as an option: it
  would change the cache layout and multiply its memory.
- **Pooling** (``pool``). ``"prompt"`` (default): the pooled score of a token is the mean over the real
  tokens of its ``kernel`` neighbourhood, the window's tokens included; positions beyond the sequence
  ends and left padding are left out of the mean, so a sample of a left-padded batch selects exactly
  what it selects alone. ``"official"``: as the official code, only the prefix before the window is
  pooled (the window's scores do not spill into its neighbours) and positions beyond the prefix's ends
  count as zeros (``avg_pool1d`` with ``count_include_pad``), which lowers the scores of the first and
  last ``kernel // 2`` prefix tokens; left padding is treated as such an end, so batches still equal
  singles.
- **Budget**: a fraction of each prompt (``retention``) instead of a fixed ``max_capacity_prompt``
  applied only to prompts longer than it; scores summed in float32 where the official code casts the
  softmax to the model's dtype first; scaling by the attention module's own factor where the official
  code uses ``1/sqrt(head_dim)`` (equal for Llama, Mistral, Qwen; not for Gemma's query scaling).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...methods.options import Choice, Integer, option
from ..context import AttentionCall, KVForward
from ..scores import window_scores
from .scorer import ScorerMethod

POOLS = ("prompt", "official")


def pool_scores(score: torch.Tensor, valid: torch.Tensor, kernel: int, window: int, pool: str) -> torch.Tensor:
    """Average-pool ``score`` ``[B, H, L]`` along the sequence over ``kernel`` neighbours (see the module
    docstring for ``pool``); ``valid`` ``[B, L]`` is False at padding, ``window`` the observation window."""
    length = score.shape[-1]
    real = valid[:, None, :].to(score.dtype)
    if pool == "official":
        real = real.clone()
        real[..., length - window:] = 0
        return F.avg_pool1d(score * real, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    total = F.avg_pool1d(score * real, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    count = F.avg_pool1d(real, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return total / count.clamp(min=1.0 / kernel)


@dataclass
class SnapKV(ScorerMethod):
    name: ClassVar[str] = "snapkv"
    paper: ClassVar[str] = "arXiv 2404.14469 (SnapKV, NeurIPS 2024)"
    description: ClassVar[str] = "baseline: keep each KV head's prompt entries most attended by the last queries"

    window: int = option(32, Integer(1))
    kernel: int = option(5, Integer(1))
    pool: str = option("prompt", Choice(POOLS))

    def validate(self) -> None:
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred pooling window), got {self.kernel}")

    def minimum(self, length: int) -> int:
        return min(self.window, length)  # the observation window

    def score(self, fwd: KVForward, call: AttentionCall, valid: torch.Tensor) -> torch.Tensor:
        key = call.layer.keys
        length = key.shape[2]
        window = min(self.window, length)
        score = window_scores(call.query, key, window, call.module.scaling, valid)  # [B, Hkv, L]
        score = pool_scores(score, valid, self.kernel, window, self.pool)
        score[..., length - window:] = float("inf")  # the observation window is always kept
        return score
