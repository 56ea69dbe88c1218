"""Static units: skip the video units that repeat the previous temporal patch before the vision tower
(run-length tokenization, Choudhury et al., NeurIPS 2024, applied to Qwen-VL encoders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .base import Selection, Step, VisualMethod
from .options import Fraction, Number, option


@dataclass
class Static(VisualMethod):
    """Before the vision tower, compare each spatial merge unit (the 2x2 patch group of one 2-frame
    temporal patch that becomes one LLM token) with the same unit of the previous temporal patch, on
    the processor's normalised pixels (mean absolute difference), and do not encode the units that
    barely changed. The tower runs on the kept units only, with their original 2-D rotary positions,
    per-frame attention and Qwen2.5-VL's window attention over the kept units of each window (a
    partial grid, see :mod:`tokenreduce.vision.qwen_partial`). Every placeholder still gets a feature:
    a skipped unit gets the features of the kept unit at its place in the last encoded temporal patch,
    and before LLM layer 0 it is merged into that unit's row, so the LLM sees one token of size ``n``
    at the kept unit's original position (M-RoPE too), and later methods see consistent sizes.

    ``threshold``: a unit is static when its change is under it (normalised pixel units: about
    0.015 per grey level with the Qwen processors' CLIP normalisation; default 0.05 when no
    ``retention`` is given). ``retention``: encode ``ceil(retention * units)`` units per video,
    skipping the least-changing first; with a ``threshold`` too, a unit changing by at least the
    threshold is never skipped (so more may be encoded). The first temporal patch is always encoded.

    Deviation from RLT: RLT drops repeated patches of a video transformer and adds a run-length
    embedding; here the run is represented by its first unit with its size carried into the LLM
    (tokens are merged, not removed), and no learned length embedding exists, so nothing is trained.
    A slowly drifting unit is compared with its predecessor, not with the unit representing it.
    Qwen2-VL, Qwen2.5-VL and Qwen3-VL (deepstack features are expanded the same way); images pass
    through. LLaVA towers have no temporal patches: use ``tome-vision`` there.
    """

    name: ClassVar[str] = "static"
    description: ClassVar[str] = "skip video units that repeat the previous frame before the vision tower (Qwen-VL)"
    stages: ClassVar[tuple[str, ...]] = ("vision", "embed")

    threshold: float | None = option(None, Number(0, none=True))  # 0 skips nothing
    retention: float | None = option(None, Fraction(none=True))

    def validate(self) -> None:
        if self.threshold is None and self.retention is None:
            self.threshold = 0.05

    def act_layers(self, num_layers: int) -> set[int]:
        return {0}

    def setup(self, engine: Any) -> None:
        from ..vision.static_tower import StaticTower

        StaticTower(engine, self)  # its hooks live in the engine's handles and wrappers

    def reduce(self, step: Step) -> Selection | None:
        from ..engine.vision import representative_dest

        memo = step.memo
        if "reps" not in memo:  # no video was encoded for this prefill
            return None
        return Selection(representative_dest(step.rows, memo["layout"], memo["repeat"], memo["reps"], self.name))
