"""``static`` on a Qwen-VL model: video pixels are split into kept and static units before the tower,
the tower runs on the kept units' partial grid, and its output is expanded back to every placeholder."""

from __future__ import annotations

from typing import Any

import torch

from ..engine.vision import VisionHandOff
from ..threads import PerThread
from .qwen_partial import run_partial
from .static_units import UnitPlan, plan_units, unit_changes

QWEN_CLASSES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                "Qwen3VLForConditionalGeneration")


class StaticTower:
    """Hooks of one ``static`` method on one Qwen-VL model (installed by ``Static.setup``)."""

    videos = PerThread(bool)  # inside get_video_features in this thread: the tower call encodes videos

    def __init__(self, engine: Any, method: Any) -> None:
        name = type(engine.model).__name__
        if name not in QWEN_CLASSES:
            raise ValueError(f"static needs a Qwen-VL vision tower (spatial merge units of 2-frame temporal patches); "
                             f"{name} is not one. Supported: {', '.join(QWEN_CLASSES)}. For LLaVA-OneVision / "
                             "LLaVA-NeXT-Video use tome-vision")
        self.method = method
        self.handoff = VisionHandOff(engine, method)
        self.handoff.check_first()
        base = engine.adapter.base_model(engine.model)
        self.visual = base.visual
        engine._wrap(base, "get_video_features", self._video_features)
        engine._wrap(self.visual, "forward", self._tower)

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
        merge = self.visual.spatial_merge_size
        changes = unit_changes(hidden_states, grid_thw, merge)
        plans = [plan_units(c, self.method.threshold, self.method.retention) for c in changes]
        self.handoff.publish({"reps": [p.rep for p in plans]}, self._notes(plans, merge))
        keep = torch.cat([p.keep for p in plans])
        if bool(keep.all()):
            return original(hidden_states, grid_thw=grid_thw, **kwargs)
        offsets = torch.tensor([0] + [p.keep.numel() for p in plans[:-1]], device=keep.device).cumsum(0)
        rep = torch.cat([p.rep + o for p, o in zip(plans, offsets, strict=True)])
        return run_partial(original, self.visual, hidden_states, grid_thw, keep, rep, **kwargs)

    def _notes(self, plans: list[UnitPlan], merge: int) -> dict[str, Any]:
        unit = merge * merge
        items = [{"kind": "video", "frames": p.frames, "units": p.keep.numel(), "units_encoded": p.encoded,
                  "patches_in": p.keep.numel() * unit, "patches_encoded": p.encoded * unit,
                  "static_fraction": 1 - p.encoded / p.keep.numel()} for p in plans]
        total = sum(i["units"] for i in items)
        encoded = sum(i["units_encoded"] for i in items)
        return {"patches_in": total * unit, "patches_encoded": encoded * unit,
                "static_fraction": 1 - encoded / total if total else 0.0, "items": items}
