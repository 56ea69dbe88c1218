"""PyramidDrop (Xing et al., 2024, arXiv 2410.17247): drop visual tokens stage by stage, a pyramid."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..ops import topk_mask
from .base import Method, Selection, Step, budget, check_fraction, check_layer


@dataclass
class PyramidDrop(Method):
    """Split the LLM into stages at ``layers`` (default: a quarter, half and three quarters of its
    depth, i.e. the paper's 8/16/24 of 32); at the end of each stage keep the ``retention`` fraction
    (the paper's lambda, 0.5) of the visual tokens the stage had, ranked by the attention the last
    ``last_queries`` tokens (the instruction's end) pay them. Visual tokens left after the k-th drop:
    ``retention ** k`` of the original.

    Deviation: the paper (and its code) scores through the *next* layer's norm and q/k projections;
    here the scores come from the post-RoPE queries and keys of the layer just run, observed in the
    attention function (one layer earlier, no extra projections). Tokens are removed, not masked.
    """

    name: ClassVar[str] = "pyramiddrop"
    description: ClassVar[str] = "drop visual tokens stage by stage by last-token attention (PyramidDrop baseline)"
    stages: ClassVar[tuple[str, ...]] = ("layer",)

    retention: float = 0.5
    layers: tuple[int, ...] | None = None
    last_queries: int = 1

    def validate(self) -> None:
        check_fraction("retention", self.retention)
        check_layer("last_queries", self.last_queries, minimum=1)
        if self.layers is not None:
            self.layers = tuple(self.layers)
            for layer in self.layers:
                check_layer("layers[i]", layer, minimum=1)
            if list(self.layers) != sorted(set(self.layers)):
                raise ValueError(f"pyramiddrop: layers must be increasing and distinct, got {self.layers}")

    @property
    def n_queries(self) -> int:
        return self.last_queries

    def drop_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is not None:
            return self.layers
        return tuple(sorted({max(1, round(num_layers * k / 4)) for k in (1, 2, 3)} - {num_layers}))

    def check_model(self, num_layers: int) -> None:
        bad = [layer for layer in self.drop_layers(num_layers) if layer >= num_layers]
        if bad:
            raise ValueError(f"pyramiddrop: layers {bad} do not exist before a layer of this {num_layers}-layer "
                             f"LLM; choose layers in [1, {num_layers - 1}]")

    def act_layers(self, num_layers: int) -> set[int]:
        return set(self.drop_layers(num_layers))

    def score_layers(self, num_layers: int) -> set[int]:
        return {layer - 1 for layer in self.drop_layers(num_layers)}

    def reduce(self, step: Step) -> Selection | None:
        if self.retention >= 1:
            return None
        stage = step.memo["stage"] = step.memo.get("stage", 0) + 1  # memo: this forward's state
        keep = topk_mask(step.importance, step.visual, budget(self.retention ** stage, step.visual_in))
        return Selection.keep(step.valid & (~step.visual | keep))
