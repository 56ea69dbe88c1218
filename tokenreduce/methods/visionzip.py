"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
CVPR 2025, arXiv 2412.04467): dominant visual tokens by the vision tower's attention, the rest merged into a
few contextual tokens; per image or video frame."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch.nn import functional as F

from ..context import MethodContext, Prefill
from ..layout import IMAGE, VIDEO, per_sample
from .base import Selection, Step, VisualMethod
from .options import Fraction, Integer, Number, option


def zip_record(scores: torch.Tensor, keys: torch.Tensor, keep: int, dominant: int) -> torch.Tensor:
    """:func:`zip_frames` over the cells with a score; cells with a NaN score (tokens standing for no patch,
    the same cells in every frame) stay as they are."""
    free = ~scores[0].isnan()
    if bool(free.all()):
        return zip_frames(scores, keys, keep, dominant)
    index = free.nonzero().flatten()
    sub = zip_frames(scores[:, index], keys[:, index], keep, dominant)
    dest = torch.arange(scores.shape[1], device=scores.device).repeat(scores.shape[0], 1)
    dest[:, index] = torch.where(sub >= 0, index[sub.clamp(min=0)], -1)
    return dest


def zip_frames(scores: torch.Tensor, keys: torch.Tensor, keep: int, dominant: int) -> torch.Tensor:
    """VisionZip on a batch of frames: ``dest`` ``[F, N]``, the cell each of a frame's ``N`` cells goes to.

    The ``dominant`` cells with the highest ``scores`` ``[F, N]`` stay (ties: earlier cell first); of the
    others (in cell order), ``keep - dominant`` uniformly spaced ones (every ``(N - dominant) //
    (keep - dominant)``-th) become contextual targets, and each remaining cell goes to the target whose key
    (``keys`` ``[F, N, d]``) is most cosine-similar. ``dest == cell``: kept; otherwise merged into ``dest``;
    ``-1`` (only when ``keep == dominant``): dropped. Exactly ``keep`` cells per frame stay."""
    frames, n = scores.shape
    cells = torch.arange(n, device=scores.device).expand(frames, n)
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    is_dominant = torch.zeros_like(cells, dtype=torch.bool).scatter_(1, order[:, :dominant], True)
    contextual = keep - dominant
    if contextual == 0:
        return torch.where(is_dominant, cells, -1)
    rest = ~is_dominant
    rank = rest.long().cumsum(dim=1) - 1  # position among the non-dominant cells
    step = max(1, (n - dominant) // contextual)
    is_target = rest & (rank % step == 0) & (rank // step < contextual)
    targets = torch.sort(is_target.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :contextual]
    unit = F.normalize(keys.float(), dim=-1)
    similarity = unit @ unit.gather(1, targets[..., None].expand(-1, -1, unit.shape[-1])).transpose(1, 2)
    nearest = targets.gather(1, similarity.argmax(dim=-1))  # first target on ties
    return torch.where(is_dominant | is_target, cells, nearest)


@dataclass
class VisionZip(VisualMethod):
    """Keep ``retention`` of each image's / video frame's visual tokens: a ``dominant_fraction`` share of
    them are the tokens the vision tower attends to most, the others are contextual tokens, each the
    size-weighted mean of a uniformly spaced target token and the remaining tokens whose keys are closest
    to its key.

    The attention comes from tower layer ``layer`` (None: the layer whose output the LLM reads, LLaVA's
    ``vision_feature_layer``, the paper's penultimate layer for CLIP; Qwen-VL: the last block). It is
    computed next to the tower's own attention, which keeps its backend (SDPA / flash; no eager attention
    needed): see :mod:`tokenreduce.models.tower_probe`. Towers with a CLS token (LLaVA-NeXT-Video's CLIP)
    rank by the CLS query's attention; towers without one (SigLIP, Qwen-VL) by the attention a token
    receives averaged over all queries of its image/frame, VisionZip's rule for SigLIP.

    Deviations from the paper, which reduces inside the tower's output: the selection acts on the LLM's
    visual embeddings before LLM layer 0 (so the tower, the projector and their cost are unchanged, and
    positions stay the original ones); a contextual token is the size-weighted mean of its target's and
    members' projected embeddings (official: the sum ``target + mean(members)`` of tower features, before
    the projector, about twice a token's norm); for towers whose LLM token
    pools several patches (Qwen-VL's 2x2 merge, LLaVA video pooling) scores and keys are pooled the same way.
    Budget per frame: ``ceil(retention * tokens_per_frame)``, of which ``round(dominant_fraction * budget)``
    dominant (the paper's 54 + 10 of 64 at the default share). An image is one frame: for LLaVA's
    any-resolution images the base view and the tiles share one budget over their patch tokens, and the
    row-end newline tokens (which stand for no patch) are kept, as is LLaVA-OneVision's video newline token.
    """

    name: ClassVar[str] = "visionzip"
    description: ClassVar[str] = ("keep tokens the vision tower attends to most, merge the rest into contextual "
                                  "tokens (VisionZip)")
    stages: ClassVar[tuple[str, ...]] = ("embed",)
    reads_tower: ClassVar[bool] = True  # observes the vision tower (hooks) but does not change it

    retention: float = option(0.3, Fraction())
    dominant_fraction: float = option(54 / 64, Number(0, 1))
    layer: int | None = option(None, Integer(None, none=True))  # into the vision tower's layers; may be negative

    def act_layers(self, num_layers: int) -> set[int]:
        return {0}

    def budget(self, cells: int) -> tuple[int, int]:
        """(tokens kept, dominant tokens) of a frame of ``cells`` tokens."""
        keep = max(1, min(cells, math.ceil(cells * self.retention - 1e-9)))
        return keep, min(keep, int(keep * self.dominant_fraction + 0.5))

    def setup(self, ctx: MethodContext) -> Callable[[], None]:
        probe = ctx.tower().probe(self.layer)
        undo = probe.install(ctx.wrap)

        def hand_over(prefill: Prefill) -> None:  # each prefill's reduce reads this probe's last records
            prefill.memo(self.name).update(probe=probe, grids=prefill.layout.grids)

        ctx.on_prefill(hand_over)
        return undo

    def reduce(self, step: Step) -> Selection | None:
        if self.retention >= 1:
            return None
        memo = step.memo
        if "probe" not in memo:
            raise RuntimeError("visionzip ranks tokens by the vision tower's attention, which it observes through "
                               "hooks installed by tokenreduce.patch(model, 'visionzip'); it cannot be driven on "
                               "features alone")
        probe, grids = memo["probe"], memo["grids"]
        device = step.rows.device
        memo["records"] = probe.take()
        records = _records_per_item(memo["records"], grids)
        cells_of = torch.zeros(len(grids), step.max_items, dtype=torch.long)
        start_of = torch.zeros(len(grids), step.max_items, dtype=torch.long)
        tables, offset, done, counts = [], 0, {}, []
        for b, sample in enumerate(grids):
            for i, spec in enumerate(sample):
                record = records[b][i]
                if (record.frames, record.cells) != (spec.frames, spec.cells):
                    raise RuntimeError(f"visionzip: the vision tower encoded {record.frames} x {record.cells} "
                                       f"tokens for item {i} of sample {b}, the prompt has {spec.frames} x "
                                       f"{spec.cells}")
                free = spec.cells - int(record.scores[0].isnan().sum())
                keep, dominant = self.budget(free)
                if id(record) not in done:
                    done[id(record)] = zip_record(record.scores, record.keys, keep, dominant).to(device)
                dest = done[id(record)]
                frame_start = offset + torch.arange(spec.frames, device=device)[:, None] * spec.cells
                tables.append(torch.where(dest >= 0, dest + frame_start, -1).flatten())
                cells_of[b, i], start_of[b, i] = spec.cells, offset
                offset += spec.frames * spec.cells
                counts.append({"sample": b, "item": i, "frames": spec.frames, "tokens_per_frame": free,
                               "kept_per_frame": keep, "dominant_per_frame": dominant})
        if not tables:
            return None
        table = torch.cat(tables)
        in_frame = step.visual & (step.frame >= 0)
        n_visual = step.visual.sum(dim=1)
        if not torch.equal(n_visual.cpu(), step.visual_in.cpu()):
            raise ValueError("visionzip must see every visual token of the prompt: compose it before methods that "
                             "reduce before LLM layer 0")
        item = step.item.clamp(min=0)
        flat = start_of.to(device).gather(1, item) + step.frame.clamp(min=0) * cells_of.to(device).gather(1, item)
        flat = torch.where(in_frame, flat + step.cell.clamp(min=0), -1)
        rows = step.row_index()
        row_of = torch.full((offset + 1,), -1, dtype=torch.long, device=device)
        row_of[flat[in_frame]] = rows[in_frame]  # each sample's items own their own table entries
        goes_to = table[flat.clamp(min=0)]
        dest_row = row_of[torch.where(goes_to >= 0, goes_to, offset)]
        dest = torch.where(in_frame, dest_row, torch.where(step.valid, rows, -1))
        return Selection(dest, notes={"reference": probe.reference, "tower_layer": probe.layer, "items": counts})


def _records_per_item(records: dict[int, list], grids: list[list]) -> list[list]:
    """The tower record of each item of each sample. The tower encodes each kind's items in batch order;
    generate() may repeat every sample after encoding (beams), then consecutive copies share records."""
    out = [[None] * len(sample) for sample in grids]
    for kind, what in ((IMAGE, "image"), (VIDEO, "video")):
        wanted = [[i for i, spec in enumerate(sample) if spec.kind == kind] for sample in grids]
        total = sum(map(len, wanted))
        if not total:
            continue
        have = records.get(kind, [])
        repeat = total // max(len(have), 1)
        if not have or repeat * len(have) != total or len(grids) % repeat:
            raise RuntimeError(f"visionzip: the prompt has {total} {what}s but the vision tower's last {what} "
                               f"encoding holds {len(have)}; was the tower run for this prompt?")
        mine = per_sample(len(grids), repeat, partial(_take, iter(have), wanted))
        for b, items in enumerate(wanted):
            for i, record in zip(items, mine[b], strict=True):
                out[b][i] = record
    return out


def _take(encoded: Iterator[Any], wanted: list[list[int]], b: int) -> list[Any]:
    """Sample ``b``'s records: the next one of the encoding (batch order) for each of its wanted items."""
    return [next(encoded) for _ in wanted[b]]


__all__ = ["VisionZip", "zip_frames", "zip_record"]
