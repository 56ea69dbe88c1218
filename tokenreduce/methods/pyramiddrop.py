"""PyramidDrop (Xing et al., 2024, arXiv 2410.17247): drop visual tokens stage by stage, a pyramid."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ..context import MethodContext
from ..ops import topk_mask
from .base import Selection, Step, VisualMethod, budget, check_positions
from .options import Choice, Fraction, Integer, Layers, option


@dataclass
class PyramidDrop(VisualMethod):
    """Split the LLM into stages at ``layers`` (default: a quarter, half and three quarters of its
    depth, i.e. the paper's 8/16/24 of 32); at the end of each stage keep the ``retention`` fraction
    (the paper's lambda, 0.5) of the visual tokens the stage had, ranked by the attention the last
    ``last_queries`` tokens (the instruction's end) pay them. Visual tokens left after the k-th drop:
    ``retention ** k`` of the original.

    Deviation: the paper (and its code) scores through the *next* layer's norm and q/k projections;
    here the scores come from the post-RoPE queries and keys of the layer just run, observed in the
    attention function (one layer earlier, no extra projections). Tokens are removed, not masked.
    Kept count after the k-th drop: ``ceil(retention ** k * N)`` (``rounding="ceil"``, the default); the
    official code truncates, ``int(N * ratio_k)``: ``rounding="official"`` keeps that count.

    Positions: kept tokens keep their original positions (``positions="original"``, the default).
    ``positions="renumbered"``: from the first drop on, each sample's kept tokens take contiguous
    positions (renumbered again after every drop), as if the dropped tokens had never been in the
    prompt; a token generated next follows the kept ones in those layers. An ablation switch, to measure
    what keeping the original positions is worth; refused on M-RoPE models (Qwen-VL), whose 3-D visual
    positions have no contiguous renumbering. See ``engine.prefill.renumbered_index``.
    """

    name: ClassVar[str] = "pyramiddrop"
    description: ClassVar[str] = "drop visual tokens stage by stage by last-token attention (PyramidDrop baseline)"
    stages: ClassVar[tuple[str, ...]] = ("layer",)

    retention: float = option(0.5, Fraction())
    layers: tuple[int, ...] | None = option(None, Layers(minimum=1, ordered=True, none=True))
    last_queries: int = option(1, Integer(1))
    rounding: str = option("ceil", Choice(("ceil", "official")))
    positions: str = option("original", Choice(("original", "renumbered")))

    @property
    def n_queries(self) -> int:
        return self.last_queries

    def drop_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        return tuple(sorted({max(1, round(num_layers * k / 4)) for k in (1, 2, 3)} - {num_layers}))

    def check_model(self, num_layers: int) -> None:
        super().check_model(num_layers)
        if not self.drop_layers(num_layers):
            raise ValueError(f"pyramiddrop: a {num_layers}-layer LLM has no layer to drop before; give layers=(...)")

    def act_layers(self, num_layers: int) -> set[int]:
        return set(self.drop_layers(num_layers))

    def score_layers(self, num_layers: int) -> set[int]:
        return {layer - 1 for layer in self.drop_layers(num_layers)}

    def reduce(self, step: Step) -> Selection | None:
        if self.retention >= 1:
            return None
        stage = step.memo["stage"] = step.memo.get("stage", 0) + 1  # memo: this forward's state
        count = budget(self.retention ** stage, step.visual_in, "floor" if self.rounding == "official" else "ceil")
        keep = topk_mask(step.importance, step.visual, count)
        return Selection.keep(step.valid & (~step.visual | keep), renumber=self.positions == "renumbered")

    def setup(self, ctx: MethodContext) -> Callable[[], None] | None:
        check_positions(self, ctx)
        return None
