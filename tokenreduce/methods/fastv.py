"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): the classic baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ops import topk_mask
from .base import Method, Selection, Step, budget, check_fraction, check_layer


@dataclass
class FastV(Method):
    """Keep the ``retention`` fraction of visual tokens with the highest attention from the last
    ``n_queries`` tokens, after the first ``layer`` LLM layers have seen them all.

    The importance comes from layer ``layer - 1``'s own post-RoPE queries and keys, in a small
    separate product (no attention matrix is materialised, so SDPA stays on); the drop happens
    before layer ``layer``. Kept tokens keep their original positions.
    """

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "prune visual tokens by last-token attention after layer K (FastV baseline)"
    stages: ClassVar[tuple[str, ...]] = ("layer",)

    retention: float = 0.5
    layer: int = 2
    last_queries: int = 1

    def validate(self) -> None:
        check_fraction("retention", self.retention)
        check_layer("layer", self.layer, minimum=1)
        check_layer("last_queries", self.last_queries, minimum=1)

    @property
    def n_queries(self) -> int:
        return self.last_queries

    def check_model(self, num_layers: int) -> None:
        if self.layer >= num_layers:
            raise ValueError(f"fastv: layer={self.layer} but the model has {num_layers} LLM layers; "
                             f"choose 1 <= layer <= {num_layers - 1}")

    def act_layers(self, num_layers: int) -> set[int]:
        return {self.layer}

    def score_layers(self, num_layers: int) -> set[int]:
        return {self.layer - 1}

    def reduce(self, step: Step) -> Selection | None:
        if self.retention >= 1:
            return None
        keep_visual = topk_mask(step.importance, step.visual, budget(self.retention, step.visual_in))
        return Selection.keep(step.valid & (~step.visual | keep_visual))
