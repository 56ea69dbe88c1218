"""Token merging inside pre-norm ViT vision towers (CLIP, SigLIP, DINOv2) (ToMe: Bolya et al., "Token
Merging: Your ViT but Faster", ICLR 2023), implemented from the paper's description.

In every encoder layer, between attention and MLP: the tokens are split alternately into two sets A and
B; each A token is matched to its most similar B token by the cosine similarity of the layer's keys
(averaged over heads); the ``r`` best-matched A tokens are merged into their B partners as a size-weighted
mean, and sizes add up. Attention is proportional: a token standing for ``s`` patches gets ``log s`` added
to its attention logits (an additive mask for SDPA/eager), as if its ``s`` copies were all there. A CLS
token (CLIP, DINOv2) is never merged. At the tower's output every patch gets the features of the token it
was merged into ("unmerging"), so projector, pooling and the LLM see the full grid.

A layer is seen through :class:`EncoderBlock`, which its tower family describes
(``tokenreduce.models.towers``): what its attention branch and its MLP branch add to the residual stream.
So the merge sits exactly where ToMe puts it whatever the layer's own structure: after CLIP's
``x + attn(norm1(x))``, after DINOv2's ``x + layer_scale1(attn(norm1(x)))`` (the residual stream as the
layer holds it, layer-scale applied), before the MLP branch.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..ops import weighted_merge


class EncoderBlock(Protocol):
    """One pre-norm encoder layer of a vision tower, as its family describes it: ``x + attention_update(x)``
    then ``x + mlp_update(x)`` is the layer's forward."""

    heads: int  # attention heads (the merge metric averages the keys over them)
    k_proj: Any  # the key projection module (its output, hooked, is the merge metric)

    def attention_update(self, hidden: torch.Tensor, bias: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """What the attention branch adds to ``hidden`` ``[B, N, D]``, with ``bias`` ``[B, 1, 1, N]`` added to
        every attention logit (proportional attention)."""

    def mlp_update(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the MLP branch adds to ``hidden``."""


def merge_count(n: int, r: int, protect_first: bool) -> int:
    """How many of ``n`` tokens one bipartite step can merge when asked for ``r`` (at most one per A token
    outside the protected one, at most as many as there are B tokens)."""
    return max(0, min(r, (n + 1) // 2 - int(protect_first), n // 2))


def bipartite_dest(metric: torch.Tensor, r: int, protect_first: bool = False) -> torch.Tensor:
    """``dest`` ``[B, N]``: the token each token folds into (itself when kept). A = even positions,
    B = odd; the ``r`` A tokens whose best B match is most similar (cosine of ``metric`` ``[B, N, d]``)
    fold into that match. ``protect_first`` keeps token 0 (a CLS token) out of the matching."""
    bsz, n, _ = metric.shape
    ar = torch.arange(n, device=metric.device)
    dest = ar.expand(bsz, n).clone()
    r = merge_count(n, r, protect_first)
    if r == 0:
        return dest
    a_idx, b_idx = ar[0::2], ar[1::2]
    m = F.normalize(metric.float(), dim=-1)
    scores = m[:, a_idx] @ m[:, b_idx].transpose(1, 2)
    if protect_first:
        scores[:, 0] = -torch.inf
    best, match = scores.max(dim=-1)
    top = best.topk(r, dim=-1).indices
    dest.scatter_(1, a_idx[top], b_idx[match.gather(1, top)])
    return dest


def merge_tokens(x: torch.Tensor, size: torch.Tensor, dest: torch.Tensor, kept: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge ``x`` ``[B, N, D]`` (sizes ``[B, N]``) along ``dest``, which keeps ``kept`` tokens in every
    sample; returns the kept tokens in their original order, their sizes, and ``new`` ``[B, N]``: each
    old token's index among the kept ones (for tokens merged away, their destination's)."""
    bsz, n = dest.shape
    ar = torch.arange(n, device=dest.device).expand(bsz, n)
    keep = dest == ar
    merged, new_size = weighted_merge(x, size, dest)
    index = torch.where(keep, ar, n + ar).sort(dim=1).values[:, :kept]
    position = torch.zeros_like(dest).scatter_(1, index, torch.arange(kept, device=dest.device).expand(bsz, kept))
    new = position.gather(1, dest)
    return merged.gather(1, index[..., None].expand(-1, -1, x.shape[-1])), new_size.gather(1, index), new


@dataclass
class TowerPass:
    """One tower call: current sizes, each patch's current token (``source`` ``[B, N]``), and the source
    map of each layer's output so the recorded hidden states can be unmerged. A map is kept with a weak
    reference to its tensor, not with the tensor's ``id()``: a layer output the tower did not keep is freed,
    and a later tensor reusing its address must not be unmerged with its map."""

    size: torch.Tensor
    source: torch.Tensor
    maps: list[tuple[weakref.ref, torch.Tensor]] = field(default_factory=list)
    keys: torch.Tensor | None = None
    tokens_per_layer: list[int] = field(default_factory=list)

    def record(self, output: torch.Tensor) -> None:
        """Remember the current source map as ``output``'s."""
        self.maps.append((weakref.ref(output), self.source))

    def source_of(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The source map recorded for this very tensor, or None if it is not a recorded layer output."""
        return next((source for ref, source in self.maps if ref() is hidden), None)


def tome_layer(block: EncoderBlock, ctx: TowerPass, r: int, protect_first: bool, hidden_states: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any) -> torch.Tensor:
    """One encoder layer (``block``) with proportional attention and a merge of ``r`` tokens between its
    attention branch and its MLP branch. ``ctx.keys`` must hold this layer's key projection output (a hook
    on ``block.k_proj`` sets it while the attention branch runs)."""
    if attention_mask is not None:
        raise ValueError("tome-vision: the vision tower was called with an attention mask; it supports "
                         "towers that attend over all patches")
    bias = ctx.size.log().to(hidden_states.dtype)[:, None, None, :]
    x = hidden_states + block.attention_update(hidden_states, bias, **kwargs)
    metric = ctx.keys.view(*ctx.keys.shape[:2], block.heads, -1).mean(dim=2)
    n = x.shape[1]
    count = merge_count(n, r, protect_first)
    if count:
        x, ctx.size, new = merge_tokens(x, ctx.size, bipartite_dest(metric, r, protect_first), n - count)
        ctx.source = new.gather(1, ctx.source)
    x = x + block.mlp_update(x)
    ctx.record(x)
    ctx.tokens_per_layer.append(x.shape[1])
    return x


def unmerge(t: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``[B, n, D]`` merged tokens to ``[B, N, D]``: every patch gets its token's features."""
    return t.gather(1, source.to(t.device)[..., None].expand(-1, -1, t.shape[-1]))
