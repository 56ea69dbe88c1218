"""ScorerMethod: a cache method that only scores the prompt's entries; the base keeps the best of them.

After a dense prefill, :meth:`ScorerMethod.compress` asks :meth:`~ScorerMethod.score` for one score per entry
(per KV head, or one row shared by all heads), leaves padding out, and keeps ``retention`` of each prompt's
real tokens (``ceil``, at least :meth:`~ScorerMethod.minimum`), the best-scored ones in their original order
(as kvpress's ``ScorerPress`` does for its presses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...methods.options import Fraction, option
from ..context import AttentionCall, KVForward
from ..select import budgets, top_entries
from .base import CacheMethod


@dataclass
class ScorerMethod(CacheMethod):
    """Keep the ``retention`` best-scored entries of each prompt; a subclass writes :meth:`score`."""

    retention: float = option(0.3, Fraction())

    def score(self, fwd: KVForward, call: AttentionCall, valid: torch.Tensor) -> torch.Tensor:
        """Scores ``[B, 1|Hkv, L]`` of the prompt's entries (higher is kept first; ``inf``: always kept).
        ``valid`` ``[B, L]`` is False at padding, which the base never keeps whatever its score."""
        raise NotImplementedError

    def minimum(self, length: int) -> int:
        """Entries every prompt of ``length`` tokens keeps at least (capped at its real tokens)."""
        return 1

    def compress(self, fwd: KVForward, call: AttentionCall) -> None:
        if self.retention >= 1.0:
            return
        layer = call.layer
        valid = fwd.valid_rows(layer.keys)
        score = self.score(fwd, call, valid).masked_fill(~valid[:, None, :], float("-inf"))
        keep = budgets(self.retention, valid, minimum=self.minimum(layer.keys.shape[2]))
        index, ok = top_entries(score, keep)
        layer.keep(index, ok)
