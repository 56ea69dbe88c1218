"""Static units: skip the video units that repeat the previous temporal patch before the vision tower
(run-length tokenization, Choudhury et al., NeurIPS 2024, applied to Qwen-VL encoders)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..context import MergeUnitTower, MethodContext
from ..layout import VIDEO, TokenLayout, per_sample
from ..threads import PerThread
from ..vision.static_units import UnitPlan, plan_units, unit_changes
from .base import Selection, Step, VisualMethod
from .options import Fraction, Number, option


@dataclass
class Static(VisualMethod):
    """Before the vision tower, compare each spatial merge unit (the 2x2 patch group of one 2-frame
    temporal patch that becomes one LLM token) with the same unit of the previous temporal patch, on
    the processor's normalised pixels (mean absolute difference), and do not encode the units that
    barely changed. The tower runs on the kept units only, with their original 2-D rotary positions,
    per-frame attention and Qwen2.5-VL's window attention over the kept units of each window (a
    partial grid, see :mod:`tokenreduce.models.qwen_partial`). Every placeholder still gets a feature:
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

    def setup(self, ctx: MethodContext) -> None:
        if "merge_units" not in ctx.features:
            raise ValueError(f"static needs a Qwen-VL vision tower (spatial merge units of 2-frame temporal patches); "
                             f"{ctx.architecture} is not one. Supported: {', '.join(ctx.supported('merge_units'))}. "
                             "For LLaVA-OneVision / LLaVA-NeXT-Video use tome-vision")
        StaticTower(ctx, self)  # its hooks are undone through ctx

    def reduce(self, step: Step) -> Selection | None:
        memo = step.memo
        if "reps" not in memo:  # no video was encoded for this prefill
            return None
        return Selection(representative_dest(step.rows, memo["layout"], memo["repeat"], memo["reps"], self.name))


class StaticTower:
    """Hooks of one ``static`` method on one Qwen-VL model: video pixels are split into kept and static units
    before the tower, the tower runs on the kept units' partial grid, and its output is expanded back to every
    placeholder."""

    videos = PerThread(bool)  # inside get_video_features in this thread: the tower call encodes videos

    def __init__(self, ctx: MethodContext, method: Static) -> None:
        self.ctx, self.method = ctx, method
        self.tower: MergeUnitTower = ctx.tower()
        ctx.wrap(self.tower.encoders, "get_video_features", self._video_features)
        ctx.wrap(self.tower.module, "forward", self._tower)

    def _video_features(self, original, *args: Any, **kwargs: Any):
        outer, self.videos = self.videos, True
        try:
            return original(*args, **kwargs)
        finally:
            self.videos = outer

    def _tower(self, original, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any):
        if not self.videos:  # images: one temporal patch, nothing repeats
            return original(hidden_states, grid_thw=grid_thw, **kwargs)
        self.videos = False  # Qwen3-VL encodes videos through get_image_features: one tower call
        merge = self.tower.merge_size
        changes = unit_changes(hidden_states, grid_thw, merge)
        plans = [plan_units(c, self.method.threshold, self.method.retention) for c in changes]
        self.ctx.publish_vision({"reps": [p.rep for p in plans]}, self._notes(plans, merge))
        keep = torch.cat([p.keep for p in plans])
        if bool(keep.all()):
            return original(hidden_states, grid_thw=grid_thw, **kwargs)
        offsets = torch.tensor([0] + [p.keep.numel() for p in plans[:-1]], device=keep.device).cumsum(0)
        rep = torch.cat([p.rep + o for p, o in zip(plans, offsets, strict=True)])
        return self.tower.run_partial(original, hidden_states, grid_thw, keep, rep, **kwargs)

    @staticmethod
    def _notes(plans: list[UnitPlan], merge: int) -> dict[str, Any]:
        unit = merge * merge
        items = [{"kind": "video", "frames": p.frames, "units": p.keep.numel(), "units_encoded": p.encoded,
                  "patches_in": p.keep.numel() * unit, "patches_encoded": p.encoded * unit,
                  "static_fraction": 1 - p.encoded / p.keep.numel()} for p in plans]
        total = sum(i["units"] for i in items)
        encoded = sum(i["units_encoded"] for i in items)
        return {"patches_in": total * unit, "patches_encoded": encoded * unit,
                "static_fraction": 1 - encoded / total if total else 0.0, "items": items}


def video_items(layout: TokenLayout, repeat: int, per_video: list[Any], what: str) -> list[list[tuple[int, Any]]]:
    """Per sample, ``(layout item, entry)`` for each of its videos, handing out the encoder call's
    ``per_video`` entries in batch order (``repeat`` consecutive samples share one described sample)."""
    pos = 0

    def take(b: int) -> list[tuple[int, Any]]:
        nonlocal pos
        items = [j for j, spec in enumerate(layout.grids[b]) if spec.kind == VIDEO]
        pos += len(items)
        return list(zip(items, per_video[pos - len(items):pos], strict=False))

    out = per_sample(len(layout.grids), repeat, take)
    if pos != len(per_video):
        raise RuntimeError(f"tokenreduce {what}: the vision tower encoded {len(per_video)} videos but the prompt "
                           f"places {pos}; encode and prefill the same batch")
    return out


def representative_dest(rows: torch.Tensor, layout: TokenLayout, repeat: int, reps: list[torch.Tensor], what: str
                        ) -> torch.Tensor:
    """``dest`` ``[B, L]`` merging every video token into the row of the token whose features stand for it
    (``reps``: per video, the representative's index among the video's tokens)."""
    expected = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
    valid = layout.valid.to(rows.device)
    if not torch.equal(torch.where(valid, expected, -1), rows):
        raise RuntimeError(f"tokenreduce {what}: the rows were reduced before its merge at LLM layer 0")
    dest = expected.clone()
    for b, pairs in enumerate(video_items(layout, repeat, reps, what)):
        for item, rep in pairs:
            pos = torch.nonzero((layout.item[b] == item) & (layout.frame[b] >= 0)).flatten().to(rows.device)
            if pos.numel() != rep.numel():
                raise RuntimeError(f"tokenreduce {what}: a video has {pos.numel()} tokens in the prompt but "
                                   f"{rep.numel()} were encoded")
            dest[b, pos] = pos[rep.to(rows.device)]
    return dest
