"""Observing a VLM's vision tower without changing it: per encoded image/frame, how much attention each
LLM visual token's patches receive in one tower layer, and their keys.

Used by methods that rank visual tokens by the tower's own attention (VisionZip). The tower keeps its
attention backend (SDPA, flash): a forward pre-hook on the chosen layer's attention module takes the
layer's normalised input and recomputes only what is needed, through the layer's own q/k projections
(and rotary embedding for the Qwen-VL towers), in a small separate product:

- towers with a CLS token (CLIP in LLaVA-NeXT-Video, DINOv2): the CLS query's attention over the patch
  keys, averaged over heads (what VisionZip uses);
- towers without one (SigLIP in LLaVA-OneVision, the Qwen-VL ViTs): the attention each token receives,
  averaged over heads and over all queries of its attention segment (an image or frame; the windows of a
  Qwen2.5-VL windowed layer), as VisionZip does for SigLIP.

The patch-level results are mapped onto the LLM's token grid the way the model maps features: Qwen-VL
averages each ``spatial_merge_size**2`` merge unit (undoing Qwen2.5-VL's window order first), LLaVA-OneVision
applies its own bilinear video pooling, LLaVA-NeXT-Video pools its cells as :func:`pool_cells` says (the mean
score, or the maximum under ``spatial_pool_mode="max"``; keys averaged); LLaVA any-resolution
images go through the model's own packing (tiles, unpadding, resizing), with a NaN score on newline tokens.
"""

from __future__ import annotations

import inspect
import math
import sys
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..context import EncoderTower, TowerRecord
from ..layout import IMAGE, VIDEO
from ..threads import PerThread

ELEMENTS_PER_CHUNK = 1 << 24  # softmax entries materialised at once by mean_received_attention


def mean_received_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[S, n]``: for ``S`` independent segments with ``q``, ``k`` ``[S, heads, n, head_dim]``, the softmax
    attention each key receives, averaged over heads and queries. Chunked over segments and queries so at
    most ~``ELEMENTS_PER_CHUNK`` probabilities exist at once (never the tower's whole attention)."""
    segs, heads, n, _ = q.shape
    out = torch.zeros(segs, n, dtype=torch.float32, device=q.device)
    per_query = heads * n
    q_chunk = max(1, min(n, ELEMENTS_PER_CHUNK // per_query))
    s_chunk = max(1, ELEMENTS_PER_CHUNK // (per_query * q_chunk))
    for s in range(0, segs, s_chunk):
        ks = k[s:s + s_chunk].float()
        for start in range(0, n, q_chunk):
            logits = q[s:s + s_chunk, :, start:start + q_chunk].float() @ ks.transpose(-1, -2) * scaling
            out[s:s + s_chunk] += logits.softmax(dim=-1).sum(dim=(1, 2))
    return out / (heads * n)


def cls_attention(q: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[S, n - 1]``: the attention of token 0 (CLS) over the other tokens, averaged over heads; the
    softmax runs over all keys, CLS included, as in the tower. ``q``, ``k``: ``[S, heads, n, head_dim]``."""
    logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)).squeeze(2) * scaling
    return logits.softmax(dim=-1)[:, :, 1:].mean(dim=1)


def pool_cells(grid: torch.Tensor, stride: int, mode: str) -> torch.Tensor:
    """Scores (channel 0) and keys (the other channels) of ``grid`` ``[frames, 1 + d, side, side]`` pooled over
    LLaVA-NeXT-Video's ``stride x stride`` cells, as the model pools the features in ``spatial_pool_mode``
    ``mode``: a cell's score is the mean of its patches' scores ("average", "conv") or their maximum ("max");
    its key is always the mean of its patches' keys.

    Why the maximum under max pooling: there each channel of the LLM token is its cell's strongest patch
    (a one-patch object survives pooling undiluted), so the token is as important as the most-attended patch
    it carries; averaging would divide a lone salient patch's score by ``stride**2`` and rank its token
    behind cells of uniformly middling patches. Keys are only compared by cosine (contextual merging), where
    the mean is the cell's content; a channel-wise maximum of keys is the key of no patch."""
    keys = F.avg_pool2d(grid[:, 1:], stride, stride)
    if mode == "max":
        scores = F.max_pool2d(grid[:, :1], stride, stride)
    else:  # "average" and "conv" (a learned mix of the cell: the mean is its neutral reading)
        scores = F.avg_pool2d(grid[:, :1], stride, stride)
    return torch.cat([scores, keys], dim=1)


class TowerProbe:
    """Watches one model's vision tower; ``records[kind]`` holds the last encoding of that kind (images
    or videos), one :class:`TowerRecord` per item in the order the model encodes them (batch order).

    ``install(wrap)`` wraps the base model's ``get_image_features`` / ``get_video_features`` through
    ``wrap(obj, name, wrapper)`` (the engine's undoable per-instance wrapper) and hooks the tower; it
    returns the undo for the hooks. Subclasses know one tower family.
    """

    reference = ""  # "cls" or "mean": what the scores are
    records = PerThread(dict)  # per kind, this thread's last encoding (see take)
    kind = PerThread()  # the kind this thread is encoding right now
    pending = PerThread(list)  # the attention pre-hook's observations of this thread's encoder call
    call = PerThread(dict)  # that call's inputs

    def __init__(self, model: nn.Module, base: nn.Module, layer: int | None) -> None:
        self.model, self.base = model, base
        blocks = self.blocks()
        default = self.default_layer(len(blocks))
        index = default if layer is None else layer
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(f"layer={layer} but the vision tower has {len(blocks)} layers; "
                             f"choose -{len(blocks)} <= layer < {len(blocks)}")
        self.layer = index % len(blocks)
        self.attention = self.attention_of(blocks[self.layer])

    # family knowledge -------------------------------------------------------------------------
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def default_layer(self, depth: int) -> int:
        """The tower layer whose output the LLM reads."""
        return depth - 1

    def attention_of(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def observe(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> Any:
        """What the attention pre-hook keeps from one tower call."""
        raise NotImplementedError

    def finish(self, kind: int) -> list[TowerRecord]:
        """The records of the call that just ended (``self.pending`` observations, ``self.call`` inputs)."""
        raise NotImplementedError

    # installation -----------------------------------------------------------------------------
    def install(self, wrap) -> Any:
        for name, kind in (("get_image_features", IMAGE), ("get_video_features", VIDEO)):
            if getattr(self.base, name, None) is not None:
                self._wrap_encoder(wrap, name, kind)
        self.extra_wraps(wrap)
        handles = [self.attention.register_forward_pre_hook(self._on_attention, with_kwargs=True)]
        handles += self.extra_hooks()

        def undo() -> None:
            for handle in handles:
                handle.remove()
            self.records.clear()

        return undo

    def extra_hooks(self) -> list[Any]:
        return []

    def extra_wraps(self, wrap) -> None:
        """Further per-instance wrappers a family needs (undone by the engine)."""

    def take(self) -> dict[int, list[TowerRecord]]:
        """The records of the last encodings, handed over once: a later prompt whose tower did not run
        (so nothing describes its visual tokens) finds none instead of stale ones."""
        records, self.records = self.records, {}
        return records

    def _wrap_encoder(self, wrap, name: str, kind: int) -> None:
        signature = inspect.signature(getattr(self.base, name))

        def encoder(original, *args: Any, **kwargs: Any):
            if self.kind is not None:  # an encoder calling another (Qwen3-VL videos): the outer call decides
                return original(*args, **kwargs)
            self.kind, self.pending = kind, []
            self.call = dict(signature.bind_partial(*args, **kwargs).arguments)
            try:
                out = original(*args, **kwargs)
                self.records[kind] = self.finish(kind)
                return out
            finally:
                self.kind, self.pending, self.call = None, [], {}

        wrap(self.base, name, encoder)

    def _on_attention(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self.kind is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            self.pending.append(self.observe(hidden, kwargs))


class LlavaTowerProbe(TowerProbe):
    """The CLIP (LLaVA-NeXT-Video), DINOv2 (CLS reference) or SigLIP (LLaVA-OneVision, mean reference)
    tower of a LLaVA model, read through its description ``tower`` (:class:`tokenreduce.context.EncoderTower`:
    its layers, whether token 0 is CLS, each layer's attention module and projections);
    ``bilinear_pooling``: the model pools video features bilinearly (its adapter says so)."""

    def __init__(self, model: nn.Module, base: nn.Module, layer: int | None, bilinear_pooling: bool,
                 tower: EncoderTower) -> None:
        config = model.config
        tower_type = config.vision_config.model_type
        self.tower, self.bilinear_pooling = tower, bilinear_pooling
        self.has_cls = tower.has_cls
        self.reference = "cls" if self.has_cls else "mean"
        strategy = config.vision_feature_select_strategy
        if self.has_cls and strategy != "default" or not self.has_cls and strategy != "full":
            raise ValueError(f"visionzip: vision_feature_select_strategy={strategy!r} with a {tower_type} tower "
                             "gives visual tokens that are not the tower's patch grid; supported: 'default' "
                             "(towers with a CLS token: CLIP, DINOv2; CLS dropped) and 'full' (SigLIP, no CLS)")
        super().__init__(model, base, layer)
        self.block = tower.block(self.tower.blocks[self.layer])

    def blocks(self) -> nn.ModuleList:
        return self.tower.blocks

    def default_layer(self, depth: int) -> int:
        chosen = self.model.config.vision_feature_layer
        if not isinstance(chosen, int):  # several layers concatenated: the deepest one
            chosen = max(c % (depth + 1) for c in chosen)
        # hidden_states[i] is the output of layer i - 1 (index 0: the embeddings)
        position = chosen % (depth + 1)
        if position == 0:
            raise ValueError("visionzip: vision_feature_layer selects the patch embeddings, which have no "
                             "attention; pass layer= explicitly")
        return position - 1

    def attention_of(self, block: nn.Module) -> nn.Module:
        return self.tower.block(block).attention

    def extra_wraps(self, wrap) -> None:
        signature = inspect.signature(self.base.pack_image_features)

        def pack(original, *args: Any, **kwargs: Any):
            if self.kind == IMAGE:  # remember how the model packed this call's images, to pack scores alike
                self.call["pack"] = (original, dict(signature.bind(*args, **kwargs).arguments))
            return original(*args, **kwargs)

        wrap(self.base, "pack_image_features", pack)

    def observe(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.block
        images, length, _ = hidden.shape
        shape = (images, length, block.heads, block.head_dim)
        q = block.q_proj(hidden).view(shape).transpose(1, 2)
        k = block.k_proj(hidden).view(shape).transpose(1, 2)
        if self.has_cls:
            scores, k = cls_attention(q, k, block.scaling), k[:, :, 1:]
        else:
            scores = mean_received_attention(q, k, block.scaling)
        return scores, k.float().mean(dim=1)

    def finish(self, kind: int) -> list[TowerRecord]:
        scores = torch.cat([s for s, _ in self.pending])
        keys = torch.cat([k for _, k in self.pending])
        maps = torch.cat([scores[..., None], keys], dim=-1)  # pooled together: [frames, patches, 1 + head_dim]
        return self._images(maps) if kind == IMAGE else self._videos(maps)

    def _images(self, maps: torch.Tensor) -> list[TowerRecord]:
        """Any-resolution images: the model's own packing (tiles, unpadding, resizing, newline tokens) applied
        to scores and keys; newline tokens get a NaN score."""
        if "pack" not in self.call:
            raise RuntimeError("visionzip: the model encoded images without pack_image_features; "
                               "this LLaVA version is not supported for images")
        pack, arguments = self.call["pack"]
        sizes = [feature.shape[0] for feature in arguments["image_features"]]
        if sum(sizes) != maps.shape[0]:
            raise RuntimeError(f"visionzip: the tower encoded {maps.shape[0]} tiles, the model packed {sum(sizes)}")
        arguments = {**arguments, "image_features": list(torch.split(maps, sizes))}
        if arguments.get("image_newline") is not None:
            newline = torch.zeros(maps.shape[-1], dtype=maps.dtype, device=maps.device)
            newline[0] = float("nan")
            arguments["image_newline"] = newline
        packed, lengths = pack(**arguments)  # a list per image (a concatenation in some versions)
        if isinstance(packed, torch.Tensor):
            packed = torch.split(packed, lengths.tolist())
        return [TowerRecord(p[None, :, 0].contiguous(), p[None, :, 1:].contiguous()) for p in packed]

    def _videos(self, maps: torch.Tensor) -> list[TowerRecord]:
        pixels = self.call.get("pixel_values_videos")
        if pixels is None:
            pixels = next(iter(self.call.values()))
        videos, frames = pixels.shape[:2]
        if maps.shape[0] != videos * frames:
            raise RuntimeError(f"visionzip: the tower encoded {maps.shape[0]} frames for {videos} videos of "
                               f"{frames} frames")
        side = math.isqrt(maps.shape[1])
        if self.bilinear_pooling:  # the model's own video pooling (bilinear), applied to scores and keys
            pooled = self.base.apply_pooling(maps)
        else:  # LLaVA-NeXT-Video pools stride x stride cells: see pool_cells
            grid = maps.view(-1, side, side, maps.shape[-1]).permute(0, 3, 1, 2)
            pooled = pool_cells(grid, self.model.config.spatial_pool_stride, self.model.config.spatial_pool_mode)
            pooled = pooled.flatten(2).transpose(1, 2)
        pooled = pooled.reshape(videos, frames, pooled.shape[1], -1)
        return [TowerRecord(v[..., 0].contiguous(), v[..., 1:].contiguous()) for v in pooled]


class QwenTowerProbe(TowerProbe):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL ViTs (no CLS: mean reference). Patches arrive grouped by merge
    unit (``spatial_merge_size**2`` consecutive patches form one LLM token), frame after frame."""

    reference = "mean"

    def blocks(self) -> nn.ModuleList:
        return self.base.visual.blocks

    def attention_of(self, block: nn.Module) -> nn.Module:
        return block.attn

    def extra_hooks(self) -> list[Any]:
        def on_visual(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self.kind is not None:
                self.call["grid_thw"] = args[1] if len(args) > 1 else kwargs["grid_thw"]
                self.call["visual_kwargs"] = dict(kwargs)

        return [self.base.visual.register_forward_pre_hook(on_visual, with_kwargs=True)]

    def observe(self, hidden: torch.Tensor, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.attention
        length = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        keys = k.float().mean(dim=1)  # before the rotary embedding: similarity of content, not of position
        cos, sin = kwargs["position_embeddings"]
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
        q, k = rotary(q, k, cos, sin)
        scores = torch.empty(length, dtype=torch.float32, device=hidden.device)
        bounds = kwargs["cu_seqlens"].tolist()
        start = 0
        while start < len(bounds) - 1:  # runs of equal-length segments (a video's frames) go together
            n = bounds[start + 1] - bounds[start]
            end = start + 1
            while end < len(bounds) - 1 and bounds[end + 1] - bounds[end] == n:
                end += 1
            lo, hi = bounds[start], bounds[end]
            qs = q[lo:hi].view(end - start, n, attn.num_heads, -1).transpose(1, 2)
            ks = k[lo:hi].view(end - start, n, attn.num_heads, -1).transpose(1, 2)
            scores[lo:hi] = mean_received_attention(qs, ks, attn.scaling).flatten()
            start = end
        return scores, keys

    def finish(self, kind: int) -> list[TowerRecord]:
        scores, keys = self.pending[-1]
        grid = self.call["grid_thw"]
        vision = self.model.config.vision_config
        unit = vision.spatial_merge_size**2
        scores, keys = scores.view(-1, unit), keys.view(-1, unit, keys.shape[-1])
        if hasattr(self.base.visual, "fullatt_block_indexes"):  # Qwen2.5-VL runs its blocks in window order
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                grid, spatial_merge_size=vision.spatial_merge_size, window_size=vision.window_size,
                patch_size=vision.patch_size, kwargs=dict(self.call.get("visual_kwargs", {})))
            window_index = window_index.to(scores.device)
            scores = torch.empty_like(scores).index_copy_(0, window_index, scores)
            keys = torch.empty_like(keys).index_copy_(0, window_index, keys)
        scores, keys = scores.mean(dim=1), keys.mean(dim=1)
        out, start = [], 0
        for t, h, w in grid.tolist():
            n = t * h * w // unit
            out.append(TowerRecord(scores[start:start + n].view(t, -1), keys[start:start + n].view(t, n // t, -1)))
            start += n
        return out


__all__ = ["LlavaTowerProbe", "QwenTowerProbe", "TowerProbe", "TowerRecord", "cls_attention",
           "mean_received_attention", "pool_cells"]
