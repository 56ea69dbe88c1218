"""What the last prefill did: tokens per LLM layer, kept visual tokens, time spent reducing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..layout import TokenLayout
from .timer import Timer


@dataclass
class Stats:
    """The last prefill (forward over a new prompt) of a patched model.

    ``layer_tokens[l]``: rows LLM layer ``l`` processed (the longest sample of the batch).
    ``visual_tokens_in`` / ``visual_tokens_kept``: per sample, before reduction and as the last
    layer saw them (a merged token counts once). ``kept_indices[b][l]``: the original sequence
    positions of the rows layer ``l`` processed for sample ``b``. ``reduce_ms``: wall-clock of
    the reduction's own work (selection, merging, compaction, importance). ``decode_steps``:
    forwards over generated tokens since that prefill. ``stages``: per stage (e.g. ``"vision"``) or
    method, what it did: a vision stage reports e.g. the patches the tower encoded; every method that
    reduced rows reports ``rows_before_after_layer`` ({layer: (rows before, rows after)}, longest sample).
    """

    method: str
    sequence_length: int
    layer_tokens: list[int]
    visual_tokens_in: list[int]
    visual_tokens_kept: list[int]
    kept_indices: list[list[list[int]]]
    reduce_ms: float
    decode_steps: int
    layout: TokenLayout = field(repr=False)
    stages: dict[str, dict] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> list[float]:
        return [k / n if n else 1.0 for k, n in zip(self.visual_tokens_kept, self.visual_tokens_in, strict=True)]

    def kept_grid(self, sample: int = 0, item: int = 0, layer: int = -1) -> np.ndarray:
        """``[frames, grid_h, grid_w]`` of 1 (kept at ``layer``) / 0 (merged away or dropped) for
        one image or video of one sample: what the demo draws over the frames."""
        grids = self.layout.grids[sample]
        if not 0 <= item < len(grids):
            raise ValueError(f"sample {sample} has {len(grids)} images/videos; item {item} does not exist")
        spec = grids[item]
        frames, gh, gw = spec.frames, spec.grid_h, spec.grid_w
        kept = torch.tensor(self.kept_indices[sample][layer], dtype=torch.long)
        on = torch.zeros(self.layout.shape[1], dtype=torch.bool)
        on[kept] = True
        sel = (self.layout.item[sample].cpu() == item) & (self.layout.frame[sample].cpu() >= 0)
        grid = np.zeros((frames, gh * gw), dtype=np.float32)
        f, c = self.layout.frame[sample].cpu()[sel].numpy(), self.layout.cell[sample].cpu()[sel].numpy()
        grid[f, c] = on[sel].numpy()
        return grid.reshape(frames, gh, gw)

    def summary(self) -> str:
        kept = ", ".join(f"{k}/{n}" for k, n in zip(self.visual_tokens_kept, self.visual_tokens_in, strict=True))
        return (f"{self.method}: visual tokens kept {kept}; layer tokens {self.layer_tokens}; "
                f"reduction {self.reduce_ms:.2f} ms")


class Record:
    """Accumulates one prefill's per-layer rows; turned into :class:`Stats` on demand."""

    def __init__(self, method: str, layout: TokenLayout, num_layers: int, timer: Timer,
                 stages: dict[str, dict] | None = None) -> None:
        self.method, self.layout, self.timer = method, layout, timer
        self.stages = {} if stages is None else stages
        self.method_steps: dict[str, dict[int, tuple[int, int]]] = {}  # method -> layer -> rows before, after
        self.rows: list[torch.Tensor | None] = [None] * num_layers
        self.decode_steps = 0

    def stats(self) -> Stats:
        rows = [r.cpu() for r in self.rows if r is not None]
        visual = self.layout.visual.cpu()
        kept = [[r[b][r[b] >= 0].tolist() for r in rows] for b in range(self.layout.shape[0])]
        if rows:  # what the last layer saw
            last = (visual.gather(1, rows[-1].clamp(min=0)) & (rows[-1] >= 0)).sum(dim=1).tolist()
        else:  # the forward stopped before any LLM layer
            last = visual.sum(dim=1).tolist()
        return Stats(method=self.method, sequence_length=self.layout.shape[1],
                     layer_tokens=[r.shape[1] for r in rows],
                     visual_tokens_in=visual.sum(dim=1).tolist(), visual_tokens_kept=last,
                     kept_indices=kept, reduce_ms=self.timer.total_ms(), decode_steps=self.decode_steps,
                     layout=self.layout, stages=self._stages())

    def _stages(self) -> dict[str, dict]:
        out = {k: dict(v) for k, v in self.stages.items()}
        for method, steps in self.method_steps.items():
            out.setdefault(method, {})["rows_before_after_layer"] = dict(steps)
        return out
