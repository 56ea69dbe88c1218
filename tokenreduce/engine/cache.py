"""A DynamicLayer that stores fewer rows than the prompt had but reports the prompt's length."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..hooks.cache import PositionedLayer


class ReducedDynamicLayer(PositionedLayer):
    """Cache layer of an LLM layer that processed a reduced prompt.

    It holds the kept rows physically and remembers each row's original (logical) position in
    ``positions`` ``[B, L_phys]`` (-1 for padding rows of ragged batches). ``get_seq_length``
    reports the logical length, so ``cache_position``, generated tokens' RoPE positions and the
    model's mask sizes continue from the original prompt length exactly as in the dense model;
    the engine maps the mask onto ``positions`` for this layer. Installed by swapping the class
    of a plain ``DynamicLayer`` in place.
    """

    positions: torch.Tensor | None
    logical_length: int
    pending: tuple[torch.Tensor, int] | None
    padded: bool

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> ReducedDynamicLayer:
        check_reducible(layer)
        layer.__class__ = cls
        layer.positions, layer.pending, layer.padded = None, None, False
        layer.logical_length = DynamicLayer.get_seq_length(layer)
        return layer

    def expect(self, positions: torch.Tensor, logical: int, padded: bool) -> None:
        """The next update stores rows at these logical ``positions`` and advances by ``logical``;
        ``padded`` says whether any of them is a padding row (-1), known to the caller without a sync."""
        self.pending = (positions, logical)
        self.padded = self.padded or padded

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.pending is None:
            new = torch.arange(self.logical_length, self.logical_length + n, device=key_states.device)
            new, advance = new.expand(key_states.shape[0], -1), n
        else:
            (new, advance), self.pending = self.pending, None
        self.positions = new if self.positions is None else torch.cat([self.positions, new.to(self.positions)], 1)
        self.logical_length += advance
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return self.logical_length

    def reset(self) -> None:
        super().reset()
        self.positions, self.pending, self.logical_length, self.padded = None, None, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.positions is not None:
            self.positions = self.positions[:, :tokens_to_remove]
            self.logical_length += tokens_to_remove



def check_reducible(layer: object) -> None:
    """ValueError unless ``layer`` is a cache layer whose rows tokenreduce can reduce."""
    if type(layer) not in (DynamicLayer, ReducedDynamicLayer):
        raise ValueError(f"tokenreduce reduces the KV cache of DynamicCache layers only; got {type(layer).__name__}. "
                         "Use the default dynamic cache (no cache_implementation='static', no quantized cache).")
