"""SnapKV (Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation").

After a dense prefill, the last ``window`` queries (the observation window) score every earlier key
by their attention, summed over the window and the query heads of each KV head; scores are pooled
along the sequence (``kernel``) so neighbours of important tokens survive; each KV head keeps its
top entries plus the window, ``retention`` of the prompt in all. Scores come from a small
``window x L`` product per head (never the ``L x L`` attention), so the model keeps SDPA.
Selection is per KV head as in the paper (kvpress averages over query heads of a group, as here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ...methods.options import Fraction, Integer, option
from ..scores import window_scores
from ..select import budgets, top_entries
from .base import KVMethod


@dataclass
class SnapKV(KVMethod):
    name: ClassVar[str] = "snapkv"
    description: ClassVar[str] = "baseline: keep each KV head's prompt entries most attended by the last queries"

    retention: float = option(0.3, Fraction())
    window: int = option(32, Integer(1))
    kernel: int = option(5, Integer(1))

    def validate(self) -> None:
        if self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd (a centred pooling window), got {self.kernel}")

    def compress(self, engine, index, layer, query, module, fwd) -> None:
        if self.retention >= 1.0:
            return
        key = layer.keys
        length = key.shape[2]
        valid = fwd.valid if fwd.valid is not None else torch.ones(key.shape[0], length, dtype=torch.bool,
                                                                   device=key.device)
        window = min(self.window, length)
        score = window_scores(query, key, window, module.scaling, valid)  # [B, Hkv, L]
        score = F.avg_pool1d(score, self.kernel, stride=1, padding=self.kernel // 2, count_include_pad=False)
        score[..., length - window:] = float("inf")  # the observation window is always kept
        score = score.masked_fill(~valid[:, None, :], float("-inf"))
        keep = budgets(self.retention, valid, minimum=min(window, length))
        index, ok = top_entries(score, keep)
        layer.keep(index, ok)
