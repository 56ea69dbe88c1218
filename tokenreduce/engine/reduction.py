"""The work of a reduction step: a method's Selection applied to the current rows (merge, drop, compact),
and the importance scores methods rank rows by (from the attention's own post-RoPE queries and keys)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods.base import Step, VisualMethod
from ..ops import compaction_index, last_query_importance, take_rows
from ..ops.merge import merge_compact
from .prefill import ForwardState
from .stats import Record
from .timer import Timer


def observe_importance(st: ForwardState | None, score: dict[int, set[int]], timer: Timer, module: nn.Module,
                       query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> None:
    """Importance scores of the current rows from one attention call's post-RoPE queries and keys, for
    the layers in ``score`` (layer -> the query counts methods take it with), kept in ``st``."""
    if st is None or not st.reducing or module.layer_idx not in score:
        return
    if key.shape[2] != st.rows.shape[1]:
        return
    with timer:
        scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        for n in score[module.layer_idx]:
            q_index = st.query_rows(n).to(query.device)
            scores = last_query_importance(query, key, q_index, st.valid.to(key.device), scaling)
            st.importance[n] = (st.version, scores.to(st.rows.device))


def reduce_rows(st: ForwardState, record: Record, notes: dict[str, Any], method: VisualMethod, idx: int,
                num_layers: int, hidden: torch.Tensor) -> torch.Tensor:
    """Run ``method`` before LLM layer ``idx`` and apply its Selection: merge (size-weighted, or by the
    Selection's own weights) and compact ``hidden``, update ``st``'s rows (renumbered from now on if the
    Selection asks), carry importance scores to the kept rows; ``record`` and ``notes`` (``Stats.stages``)
    get the step's report. Returns the new hidden states."""
    version, importance = st.importance.get(method.n_queries, (-1, None))
    if version != st.version:
        importance = None
    if importance is None and idx - 1 in method.score_layers(num_layers):
        raise RuntimeError(f"tokenreduce: layer {idx - 1} produced no importance scores; its attention did not "
                           "run through tokenreduce's attention function (was attn_implementation changed?)")
    step = Step(layer=idx, num_layers=num_layers, hidden=hidden, rows=st.rows, size=st.size,
                kind=st.current("kind"), item=st.current("item"), frame=st.current("frame"),
                cell=st.current("cell"), importance=importance, visual_in=st.visual_in,
                max_frames=st.max_frames, max_cells=st.max_cells, max_items=st.max_items,
                memo=st.memo.setdefault(method.name, {}))
    selection = method.reduce(step)
    if selection is None:
        return hidden
    if selection.notes is not None:
        notes[method.name] = selection.notes
    if selection.renumber and st.mrope:
        raise ValueError(f"{method.name} asks for renumbered positions, which are not defined on a model with "
                         "M-RoPE (3-D positions); keep the original positions there")
    rows_ar = step.row_index()
    dest = torch.where(st.valid, selection.dest.to(st.rows.device), -1)
    # every sample's last row is its last prompt token, whose logits generate() reads: never removed
    dest[:, -1] = torch.where(st.valid[:, -1], rows_ar[:, -1], -1)
    keep = dest == rows_ar
    merged = (dest >= 0) & ~keep
    dropped = st.valid & (dest < 0)
    counts = keep.sum(dim=1)
    # the one host sync of a reduction step: is there work, and how long is the result
    any_merged, any_dropped, low, high = torch.stack(
        [merged.any(), dropped.any(), counts.min(), counts.max()]).tolist()
    if not any_merged and not any_dropped:
        return hidden
    note = record.method_steps.setdefault(method.name, {})
    note[idx] = (st.rows.shape[1], high)  # rows (longest sample) before and after this step
    index, valid, target, padded = compaction_index(keep, (low, high), counts)
    if any_merged:  # weighted merge fused with the gather of the kept rows (one pass)
        into = torch.where(dest >= 0, dest, rows_ar)
        weight = st.size if selection.weight is None else selection.weight.to(st.size)
        hidden, size = merge_compact(hidden, weight.to(hidden.device), into.to(hidden.device), index.to(hidden.device))
        if selection.weight is not None:  # the method's own weights: sizes still add up
            size = torch.zeros_like(st.size).scatter_add_(1, into, st.size).gather(1, index.to(st.size.device))
    else:
        hidden, size = take_rows(hidden, index.to(hidden.device), 1), st.size.gather(1, index.to(st.size.device))
    rows = torch.where(valid, st.rows.gather(1, index), -1)
    lives_in = torch.where(st.owner >= 0, dest.gather(1, st.owner.clamp(min=0)), -1)
    owner = torch.where(lives_in >= 0, target.gather(1, lives_in.clamp(min=0)), -1)
    old = st.version
    st.set_rows(rows, size.to(st.size.device), padded, owner, selection.renumber)
    # the previous layer's scores, carried to the kept rows for a method reducing next at this layer
    st.importance = {n: (st.version, scores.gather(1, index.to(scores.device)))
                     for n, (version, scores) in st.importance.items() if version == old}
    return hidden
