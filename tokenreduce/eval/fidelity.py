"""How much a merging method loses on real visual features: drive its own ``reduce(Step)`` on
DINOv2 patch features laid out like a video prompt and measure the reconstruction error.

Every original visual token ``x_i`` ends up represented by the row it was merged into (a
size-weighted mean, as the engine merges), kept as itself, or dropped. The relative error is
``sqrt(sum ||x_i - x̂_i||² / sum ||x_i||²)`` over the represented tokens (``merge_error``) and, with a
dropped token's ``x̂_i = 0``, over all of them (``total_error``); ``nearest_error`` puts every
dropped token at the nearest (L2) visual row that remains, so pruning and merging methods are
compared on one footing (how far each original token is from what is left). There is no LLM here: the hidden
states do not change between "layers", so a method acting before several layers sees the merged
features again, and a method that needs attention importance (pruning) gets a uniform stand-in
(its pruned tokens are then an arbitrary choice, counted in ``dropped_fraction``, not judged).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from ..layout import TEXT, VIDEO
from ..methods import REGISTRY, Method, make_method
from ..methods.base import Selection, Step
from ..ops import weighted_merge

NUM_LAYERS = 28  # the depth of the 7B LLMs the methods' defaults were chosen for
PREFIX_ROWS, QUESTION_ROWS = 2, 6  # text rows around the video, as a prompt has them
NOT_DRIVABLE = {"vision": "acts inside the vision tower", "freeze": "changes layer computation, not tokens",
                "cache": "acts on the KV cache"}


@dataclass
class MergeResult:
    """One method on one video: fractions of the visual tokens, and the relative errors."""

    kept_fraction: float
    merged_fraction: float
    dropped_fraction: float
    merge_error: float
    total_error: float
    nearest_error: float
    layers: list[int]


def why_not_measurable(cls: type[Method]) -> str | None:
    """None if ``reduce(Step)`` of ``cls`` acts before LLM layer 0 on features alone, else the reason it cannot."""
    if cls.engine != "hf":
        return f"runs in the {cls.engine!r} engine (KV cache), not on visual tokens"
    for stage in cls.stages:
        if stage in NOT_DRIVABLE:
            return f"stage {stage!r} {NOT_DRIVABLE[stage]}"
    if "retention" not in {f.name for f in fields(cls)}:
        return "has no retention option to sweep"
    try:
        method = cls()
    except (TypeError, ValueError) as err:
        return f"cannot be built with default options ({err})"
    if 0 not in method.act_layers(NUM_LAYERS):
        return "acts only inside the LLM, choosing by its attention (features alone cannot drive it)"
    return None


def measurable_methods() -> tuple[list[str], dict[str, str]]:
    """Registered methods this module can drive, and the others with the reason."""
    ok, skipped = [], {}
    for name, cls in REGISTRY.items():
        reason = why_not_measurable(cls)
        if reason is None:
            ok.append(name)
        else:
            skipped[name] = reason
    return ok, skipped


def video_step_tensors(features: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """A one-sample prompt ``[1, L]``: a few text rows, the video's ``T x h x w`` feature rows in
    frame-major order, then the question's text rows (random features of the same scale)."""
    frames, gh, gw, dim = features.shape
    visual = features.reshape(frames * gh * gw, dim).float()
    gen = torch.Generator().manual_seed(seed)
    scale = visual.norm(dim=-1).mean() / dim**0.5
    prefix, question = (torch.randn(n, dim, generator=gen) * scale for n in (PREFIX_ROWS, QUESTION_ROWS))
    hidden = torch.cat([prefix, visual, question])[None]
    n_vis = visual.shape[0]
    text = lambda n, v: torch.full((n,), v, dtype=torch.long)  # noqa: E731
    kind = torch.cat([text(PREFIX_ROWS, TEXT), text(n_vis, VIDEO), text(QUESTION_ROWS, TEXT)])
    cells = torch.arange(gh * gw).repeat(frames)
    frame = torch.arange(frames).repeat_interleave(gh * gw)
    return {"hidden": hidden,
            "kind": kind[None], "item": torch.where(kind == VIDEO, 0, -1)[None],
            "frame": torch.cat([text(PREFIX_ROWS, -1), frame, text(QUESTION_ROWS, -1)])[None],
            "cell": torch.cat([text(PREFIX_ROWS, -1), cells, text(QUESTION_ROWS, -1)])[None],
            "max_frames": frames, "max_cells": gh * gw}


def drive(method: Method, features: torch.Tensor, num_layers: int = NUM_LAYERS, seed: int = 0) -> MergeResult:
    """Run ``method``'s step before LLM layer 0 on ``features`` ``[T, h, w, D]`` laid out as a prompt,
    apply its Selection as the engine does (size-weighted merge into the destination row, then
    compaction; the last prompt row is never removed) and measure what the visual tokens lost."""
    method.check_model(num_layers)
    t = video_step_tensors(features, seed)
    hidden, kind, item, frame, cell = t["hidden"], t["kind"], t["item"], t["frame"], t["cell"]
    original = hidden[0].clone()
    length = hidden.shape[1]
    rows = torch.arange(length)[None]
    size = torch.ones(1, length)
    owner = torch.arange(length)  # the current row each original token lives in (-1: dropped)
    visual_in = (kind == VIDEO).sum(dim=1)
    memo: dict[str, Any] = {}
    acted = []
    for layer in sorted(method.act_layers(num_layers) & {0}):
        current = rows.shape[1]
        step = Step(layer=layer, num_layers=num_layers, hidden=hidden, rows=rows, size=size,
                    kind=kind.gather(1, rows), item=item.gather(1, rows), frame=frame.gather(1, rows),
                    cell=cell.gather(1, rows), importance=None, visual_in=visual_in,
                    max_frames=t["max_frames"], max_cells=t["max_cells"], max_items=1, memo=memo)
        selection: Selection | None = method.reduce(step)
        if selection is None:
            continue
        index = step.row_index()
        dest = selection.dest.clone()
        dest[:, -1] = current - 1  # the last prompt row starts generation: never removed
        if bool((dest == index).all()):
            continue
        acted.append(layer)
        hidden, size = weighted_merge(hidden, size, torch.where(dest >= 0, dest, index))
        keep = (dest == index)[0]
        new_index = torch.full((current,), -1, dtype=torch.long)
        new_index[keep] = torch.arange(int(keep.sum()))
        lives_in = torch.where(owner >= 0, dest[0].gather(0, owner.clamp(min=0)), -1)
        owner = torch.where(lives_in >= 0, new_index.gather(0, lives_in.clamp(min=0)), -1)
        rows, hidden, size = rows[:, keep], hidden[:, keep], size[:, keep]
    return _measure(original, hidden[0], owner, kind[0] == VIDEO, kind.gather(1, rows)[0] == VIDEO, rows, acted)


def _measure(original: torch.Tensor, final: torch.Tensor, owner: torch.Tensor, visual: torch.Tensor,
             visual_rows: torch.Tensor, rows: torch.Tensor, acted: list[int]) -> MergeResult:
    x = original[visual].double()
    own = owner[visual]
    present = own >= 0
    recon = torch.zeros_like(x)
    recon[present] = final[own[present]].double()
    err = (x - recon).pow(2).sum(dim=1)
    norm = x.pow(2).sum(dim=1)
    near = err.clone()
    remaining = final[visual_rows].double()
    if bool((~present).any()) and len(remaining):
        near[~present] = torch.cdist(x[~present], remaining).min(dim=1).values.pow(2)
    n = int(visual.sum())
    kept_rows = int(visual[rows[0]].sum())
    kept_self = int((own[present] >= 0).sum())  # every present token: itself or merged
    merged = kept_self - kept_rows
    return MergeResult(
        kept_fraction=kept_rows / n, merged_fraction=merged / n, dropped_fraction=1 - kept_self / n,
        merge_error=float((err[present].sum() / norm[present].sum()).sqrt()) if bool(present.any()) else 0.0,
        total_error=float(((err[present].sum() + norm[~present].sum()) / norm.sum()).sqrt()),
        nearest_error=float((near.sum() / norm.sum()).sqrt()),
        layers=acted)


def sweep(features: torch.Tensor, specs: list[tuple[str, dict[str, Any]]], retentions: list[float],
          num_layers: int = NUM_LAYERS, failed: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``drive`` every (method name, extra options) at every retention; one dict per run. A method whose
    step fails on features alone (it needs something only a model gives, e.g. vision-tower attention) is
    left out and its error put in ``failed``."""
    out = []
    for name, options in specs:
        for retention in retentions:
            try:
                result = drive(make_method(name, retention=retention, **options), features, num_layers)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as err:
                if failed is not None:
                    failed[name] = f"its layer-0 step failed on features alone: {type(err).__name__}: {err}"
                break
            out.append({"method": name, "options": options, "retention": retention, **result.__dict__})
    return out
