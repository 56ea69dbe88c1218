"""Wall-clock of one ``generate`` call: time to first token, total, and per decoded token.

Shared by the demo and ``benchmarks/speed.py`` so both report the same quantities. On CUDA every
stamp follows a synchronize (this is for measuring, never for the library's hot path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor


class Clock:
    """``perf_counter`` in ms, after a CUDA synchronize when timing a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() * 1e3


class StepStamps(LogitsProcessor):
    """Stamps the clock whenever ``generate`` has logits: after the prefill, then after each decode step."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.stamps = clock, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(self.clock.now())
        return scores


@dataclass
class GenerateTiming:
    """``ttft_ms``: call start to the first logits (vision + prefill); ``generate_ms``: the whole call;
    ``decode_ms``: per generated token after the first (None with one token); ``sequences``: the output."""

    ttft_ms: float
    generate_ms: float
    decode_ms: float | None
    sequences: torch.Tensor


def time_generate(model: Any, inputs: dict[str, torch.Tensor], clock: Clock, **generate_kwargs: Any
                  ) -> GenerateTiming:
    """One timed ``model.generate(**inputs, **generate_kwargs)``."""
    stamps = StepStamps(clock)
    start = clock.now()
    sequences = model.generate(**inputs, logits_processor=[stamps], **generate_kwargs)
    end = clock.now()
    s = stamps.stamps
    decode = (s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else None
    return GenerateTiming(s[0] - start, end - start, decode, sequences)
