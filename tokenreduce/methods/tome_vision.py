"""ToMe inside the vision tower (Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023) for the
CLIP / SigLIP towers of LLaVA-OneVision and LLaVA-NeXT-Video."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import VisualMethod
from .options import Fraction, Integer, option


@dataclass
class TomeVision(VisualMethod):
    """In every encoder layer of the vision tower, between attention and MLP, merge ``r`` tokens per
    frame by bipartite matching on the layer's keys (size-weighted means, sizes carried), with
    proportional attention (``log size`` added to the attention logits through SDPA's additive mask);
    see :mod:`tokenreduce.vision.tome`. The tower's output is unmerged (every patch gets its token's
    features), so the projector, LLaVA's pooling and the LLM run unchanged on the full grid: the saving
    is the tower's time; compose with an LLM-stage method (``["tome-vision", "framefusion"]``) to cut
    the LLM's tokens too.

    ``retention`` (default 0.5): the fraction of a frame's patch tokens left after the last layer,
    spread as a constant ``r = ceil(patches * (1 - retention) / layers)`` per layer (ToMe's schedule);
    or ``r`` directly (``r=0`` is the dense tower). Implemented from the paper, not from its code.
    Deviation: the matching takes keys averaged over heads from the layer's own attention (as the
    paper), and merged tokens stay in their original order where ToMe's code returns ``[unmerged A, B]``
    after each layer. Attention does not depend on the order but the next layer's alternating A/B split
    does, so from the second layer on the two pair different tokens (same counts). Refused on Qwen-VL (its
    merge units feed M-RoPE): use ``static`` there.
    """

    name: ClassVar[str] = "tome-vision"
    description: ClassVar[str] = "token merging inside CLIP/SigLIP vision towers (ToMe; LLaVA-OneVision/-NeXT-Video)"
    stages: ClassVar[tuple[str, ...]] = ("vision",)

    retention: float | None = option(None, Fraction(none=True))
    r: int | None = option(None, Integer(0, none=True))

    def validate(self) -> None:
        if self.retention is not None and self.r is not None:
            raise ValueError("tome-vision: give either retention or r, not both")
        if self.r is None and self.retention is None:
            self.retention = 0.5

    def act_layers(self, num_layers: int) -> set[int]:
        return set()

    def setup(self, engine: Any) -> None:
        from ..vision.tome_tower import TomeTower

        TomeTower(engine, self)
