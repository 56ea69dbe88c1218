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

from ...methods.options import Integer, option
from ..context import AttentionCall, KVForward
from .scorer import ScorerMethod


@dataclass
class StreamingLLM(ScorerMethod):
    name: ClassVar[str] = "streamingllm"
    paper: ClassVar[str] = "arXiv 2309.17453 (StreamingLLM, ICLR 2024)"
    description: ClassVar[str] = "baseline: keep attention sinks and a recent window of the prompt's KV cache"

    sinks: int = option(4, Integer(0))

    def minimum(self, length: int) -> int:
        return self.sinks + 1

    def score(self, fwd: KVForward, call: AttentionCall, valid: torch.Tensor) -> torch.Tensor:
        length = valid.shape[1]
        order = valid.long().cumsum(-1) - 1  # rank of each real token inside its sample
        score = torch.arange(length, device=valid.device, dtype=torch.float32).expand_as(order).clone()
        score = torch.where(order < self.sinks, float(length) + 1.0, score)  # sinks beat any recent token
        return score[:, None, :]  # one row for every KV head
