"""SemToken (arXiv 2508.15190, "Semantic-Aware Tokenization for Efficient Long-Context Language Modeling"):
before the LLM, merge runs of adjacent tokens that say the same thing, coarser where content is sparse.

Contextual embeddings come from a light encoder: the model's own token embeddings averaged over a
``context`` window on each side (no extra model to load). Each adjacent pair is scored by the cosine
similarity of its contextual embeddings minus ``density_weight`` times its semantic density (how far
the tokens are from their neighbourhood: content-rich spans score low and stay fine-grained). The
best-scoring pairs merge until ``retention`` of the prompt remains; a run becomes one row, the mean
of its members' input embeddings, at its first member's position (original positions kept: decoding
continues from the prompt's length). The first ``sinks`` tokens and the last token never merge.
Merging is local (adjacent tokens only), never dropping: LLM-Microscope warns that removing
function words and punctuation loses context memory, so here they can only fold into a neighbour.
Deviation: the paper's encoder and density-driven granularity schedule are not public; this is the
closest training-free reading of its description. Only the KV cache shrinks for later layers;
the prompt's logits come back for the merged rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...methods.options import Fraction, Integer, Number, option
from ..context import AttentionCall, KVForward
from ..select import budgets
from ..stats import KVStats
from .base import CacheMethod


def merge_plan(embeds: torch.Tensor, valid: torch.Tensor, retention: float, context: int, density_weight: float,
               sinks: int) -> torch.Tensor:
    """``joins`` ``[B, L]`` bool: token t folds into the run of token t-1 (ordered, per sample)."""
    b, length, _ = embeds.shape
    e = F.normalize(embeds.float(), dim=-1) * valid[..., None]
    kernel = 2 * context + 1
    summed = F.avg_pool1d(e.transpose(1, 2), kernel, stride=1, padding=context, count_include_pad=True)
    count = F.avg_pool1d(valid[:, None].float(), kernel, stride=1, padding=context, count_include_pad=True)
    ctx = (summed / count.clamp(min=1e-6)).transpose(1, 2)
    density = 1 - F.cosine_similarity(e, ctx, dim=-1)  # [B, L]
    sim = F.cosine_similarity(ctx[:, 1:], ctx[:, :-1], dim=-1)
    score = sim - density_weight * (density[:, 1:] + density[:, :-1]) / 2  # pair (t-1, t) at index t-1
    order = valid.long().cumsum(-1) - 1
    allowed = valid[:, 1:] & valid[:, :-1] & (order[:, 1:] >= sinks)
    allowed[:, -1] = False  # the last token keeps its own row (its logits start generation)
    score = score.masked_fill(~allowed, float("-inf"))
    merges = valid.sum(-1) - budgets(retention, valid, minimum=sinks + 1)
    merges = torch.minimum(merges, allowed.sum(-1))
    joins = torch.zeros(b, length, dtype=torch.bool, device=embeds.device)
    k = int(merges.max())
    if k > 0:
        top = score.topk(k, dim=-1).indices
        take = torch.arange(k, device=embeds.device)[None] < merges[:, None]
        joins.scatter_(1, top + 1, take)
    return joins


@dataclass
class SemToken(CacheMethod):
    name: ClassVar[str] = "semtoken"
    paper: ClassVar[str] = "arXiv 2508.15190"
    description: ClassVar[str] = "merge semantically redundant adjacent tokens before the LLM, original positions"
    stages: ClassVar[tuple[str, ...]] = ("embed",)
    text_only: ClassVar[bool] = True

    retention: float = option(0.5, Fraction())
    context: int = option(2, Integer(0))
    density_weight: float = option(0.5, Number(0))
    sinks: int = option(4, Integer(0))

    def check_llm(self, parts, is_vlm: bool) -> None:
        super().check_llm(parts, is_vlm)
        if len(parts.full_attention_layers()) != parts.num_layers:
            raise TypeError("semtoken needs every layer to use full attention; this model has sliding layers")

    def begin(self, fwd: KVForward) -> None:
        if not fwd.prefill or self.retention >= 1.0:
            return
        kw = fwd.kwargs
        if kw.get("labels") is not None:
            raise ValueError("semtoken merges prompt tokens, so labels no longer line up with the logits; "
                             "compute losses on the unpatched model")
        ids = kw.get("input_ids")
        if ids is None:
            raise ValueError("semtoken needs input_ids (it merges token embeddings), not inputs_embeds")
        length = ids.shape[1]
        valid = fwd.valid if fwd.valid is not None else torch.ones_like(ids, dtype=torch.bool)
        embeds = fwd.parts.embed(ids)
        joins = merge_plan(embeds, valid, self.retention, self.context, self.density_weight, self.sinks)
        starts = valid & ~joins
        run = starts.long().cumsum(-1) - 1  # run index of every token (padding: before its first run)
        runs = starts.sum(-1)
        width = int(runs.max())
        pad = width - runs  # left padding of the reduced rows
        slot = (run + pad[:, None]).clamp(min=0)
        b, _, dim = embeds.shape
        w = valid[..., None].to(embeds.dtype)
        merged = torch.zeros(b, width, dim, dtype=embeds.dtype, device=ids.device)
        merged.scatter_add_(1, slot[..., None].expand(-1, -1, dim), embeds * w)
        size = torch.zeros(b, width, dtype=embeds.dtype, device=ids.device).scatter_add_(1, slot, w[..., 0])
        merged = merged / size.clamp(min=1)[..., None]
        rows_ok = torch.arange(width, device=ids.device)[None] >= pad[:, None]
        cols = torch.arange(length, device=ids.device).expand(b, -1)
        column = torch.full((b, width + 1), -1, dtype=torch.long, device=ids.device)
        column.scatter_(1, torch.where(starts, slot, width), torch.where(starts, cols, -1))
        column = column[:, :width]
        position = kw.get("position_ids")
        if position is None:
            position = (valid.long().cumsum(-1) - 1).clamp(min=0)
        new_pos = position.gather(-1, column.clamp(min=0).expand(*position.shape[:-1], -1))
        kw["input_ids"] = None
        kw["inputs_embeds"] = merged
        kw["attention_mask"] = rows_ok.long()
        kw["position_ids"] = torch.where(rows_ok, new_pos, 1)
        fwd.memo["semtoken"] = (length, width)
        if fwd.cache is not None:
            for i in fwd.full:
                fwd.cache.layers[i].pending = partial(_write, column[:, None, :], length)

    def attend(self, fwd: KVForward, call: AttentionCall) -> tuple[torch.Tensor, Any]:
        if fwd.prefill:  # the model's own mask over the merged rows
            return call.run(call.mask)
        return super().attend(fwd, call)

    def note(self, fwd: KVForward, record: KVStats) -> None:
        length, width = fwd.memo.get("semtoken", (fwd.length, fwd.length))
        record.computed_rows = [width] * fwd.parts.num_layers
        record.notes["tokens_in"], record.notes["rows_after_merge"] = length, width


def _write(column: torch.Tensor, length: int, layer, key: torch.Tensor, value: torch.Tensor):
    """The merged prefill's cache: rows stored as computed, each at its run's first original column."""
    out = layer.store(key, value)
    layer.append_positions(column, length)
    layer.compressed = True
    return out
