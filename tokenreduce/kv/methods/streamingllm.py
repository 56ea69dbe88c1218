"""StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks"): keep the
first ``sinks`` tokens (attention sinks) and the most recent ones.

Here the budget is ``retention`` of each prompt, applied once after a dense prefill (kvpress-style);
generated tokens are appended. Deviation: kept entries keep their original positions (the paper
re-indexes positions inside the rolling cache, which matters only past the trained context length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ...methods.options import Fraction, Integer, option
from ..select import budgets, top_entries
from .base import KVMethod


@dataclass
class StreamingLLM(KVMethod):
    name: ClassVar[str] = "streamingllm"
    description: ClassVar[str] = "baseline: keep attention sinks and a recent window of the prompt's KV cache"

    retention: float = option(0.3, Fraction())
    sinks: int = option(4, Integer(0))

    def compress(self, engine, index, layer, query, module, fwd) -> None:
        if self.retention >= 1.0:
            return
        length = layer.keys.shape[2]
        valid = fwd.valid if fwd.valid is not None else torch.ones(layer.keys.shape[0], length, dtype=torch.bool,
                                                                   device=layer.keys.device)
        keep = budgets(self.retention, valid, minimum=self.sinks + 1)
        order = valid.long().cumsum(-1) - 1  # rank of each real token inside its sample
        score = torch.arange(length, device=valid.device, dtype=torch.float32).expand_as(order).clone()
        score = torch.where(order < self.sinks, float(length) + 1.0, score)  # sinks beat any recent token
        score = score.masked_fill(~valid, float("-inf"))
        index, ok = top_entries(score[:, None, :], keep)
        layer.keep(index, ok)
