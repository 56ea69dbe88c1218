"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024): the classic baseline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..context import MethodContext
from ..ops import topk_mask
from .base import Selection, Step, VisualMethod, budget, check_positions
from .options import Choice, Fraction, Integer, Layer, option


@dataclass
class FastV(VisualMethod):
    """Keep the ``retention`` fraction of visual tokens with the highest attention from the last
    ``n_queries`` tokens, after the first ``layer`` LLM layers have seen them all.

    The importance comes from layer ``layer - 1``'s own post-RoPE queries and keys, in a small
    separate product (no attention matrix is materialised, so SDPA stays on); the drop happens
    before layer ``layer``.

    Kept count: ``ceil(retention * N)`` of a sample's ``N`` visual tokens (``rounding="ceil"``, the
    default). The official code keeps ``round(N * (1 - R))`` (``R`` = 1 - retention; Python's round,
    halves to even), one token fewer at some sizes: ``rounding="official"`` keeps that count.

    Positions: kept tokens keep their original positions (``positions="original"``, the default, as the
    official code). ``positions="renumbered"``: from layer ``layer`` on, each sample's kept tokens take
    contiguous positions, as if the dropped tokens had never been in the prompt (the layers before keep
    the original ones); a token generated next follows the kept ones there. An ablation switch, to measure
    what keeping the original positions is worth; refused on M-RoPE models (Qwen-VL), whose 3-D visual
    positions have no contiguous renumbering. See ``engine.prefill.renumbered_index``.
    """

    name: ClassVar[str] = "fastv"
    description: ClassVar[str] = "prune visual tokens by last-token attention after layer K (FastV baseline)"
    stages: ClassVar[tuple[str, ...]] = ("layer",)

    retention: float = option(0.5, Fraction())
    layer: int = option(2, Layer(minimum=1))
    last_queries: int = option(1, Integer(1))
    rounding: str = option("ceil", Choice(("ceil", "official")))
    positions: str = option("original", Choice(("original", "renumbered")))

    @property
    def n_queries(self) -> int:
        return self.last_queries

    def act_layers(self, num_layers: int) -> set[int]:
        return {self.layer}

    def score_layers(self, num_layers: int) -> set[int]:
        return {self.layer - 1}

    def reduce(self, step: Step) -> Selection | None:
        if self.retention >= 1:
            return None
        count = budget(self.retention, step.visual_in, "nearest" if self.rounding == "official" else "ceil")
        keep_visual = topk_mask(step.importance, step.visual, count)
        return Selection.keep(step.valid & (~step.visual | keep_visual), renumber=self.positions == "renumbered")

    def setup(self, ctx: MethodContext) -> Callable[[], None] | None:
        check_positions(self, ctx)
        return None
