"""The cache side shared by both engines: growing a cache's layer list, and the
position-carrying ``DynamicLayer`` both engines' cache layers derive from."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


def grow_layers(cache: Any, count: int, who: str) -> list[Any]:
    """``cache.layers``, grown to at least ``count`` layers of the cache's own layer class (a fresh
    ``DynamicCache`` creates its layers lazily, but an engine adopts a layer before it is written);
    ValueError naming ``who`` if the cache has no per-layer storage or cannot create layers."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"{who} need(s) a transformers DynamicCache (a Cache with per-layer storage); "
                         f"got {type(cache).__name__}")
    while len(layers) < count:
        if getattr(cache, "layer_class_to_replicate", None) is None:
            raise ValueError(f"{who}: the cache {type(cache).__name__} has no layer for layer {len(layers)} "
                             "and cannot create one (it has fewer layers than the model)")
        layers.append(cache.layer_class_to_replicate())
    return layers


class PositionedLayer(DynamicLayer):
    """A ``DynamicLayer`` that also keeps ``positions`` (the original position of every stored row, batch
    first): batch expansion (beams), selection and reordering apply to them as to the keys and values.
    A subclass of ``DynamicLayer`` adding no storage, so a plain layer's class can be swapped in place."""

    positions: torch.Tensor | None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
