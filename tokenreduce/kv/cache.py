"""KVLayer: a transformers ``DynamicLayer`` that stores a subset of a prompt's entries but reports its length.

Every stored entry carries its logical position (the cache column it had in the dense model), so
generated tokens keep the dense model's positions and mask sizes (``get_seq_length`` is the logical
length) while attention only sees what is stored; the KV attention function builds the mask from
``positions``. Positions are ``[B, 1, L]`` (the same for every KV head) or ``[B, Hkv, L]`` after a
per-head selection; -1 marks an empty slot (ragged budgets in a batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ..hooks.cache import PositionedLayer


class KVLayer(PositionedLayer):
    """A ``DynamicLayer`` with logical positions; installed by swapping the class of a plain one in place."""

    positions: torch.Tensor | None
    logical: int
    compressed: bool  # stored entries differ from the dense ones: attention needs this layer's own mask
    pending: Callable[[KVLayer, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None
    state: dict[str, Any]  # a method's per-layer state (retrieval blocks, shared keys)

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> KVLayer:
        if type(layer) not in (DynamicLayer, KVLayer):
            raise ValueError(f"tokenreduce's KV methods need DynamicCache layers; got {type(layer).__name__}. "
                             "Use the default dynamic cache (no static, offloaded or quantized cache).")
        if type(layer) is DynamicLayer:
            n = DynamicLayer.get_seq_length(layer)
            layer.__class__ = cls
            layer.logical, layer.compressed, layer.pending, layer.state = n, False, None, {}
            layer.positions = None
            if n:
                layer.positions = torch.arange(n, device=layer.keys.device).expand(layer.keys.shape[0], 1, -1)
        return layer

    @staticmethod
    def restore(layer: KVLayer) -> None:
        """Back to a plain ``DynamicLayer`` (on unpatch); only valid while it holds dense entries."""
        if layer.compressed:
            layer.reset()
        layer.__class__ = DynamicLayer
        for name in ("positions", "logical", "compressed", "pending", "state"):
            layer.__dict__.pop(name, None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending is not None:  # a method writes this prefill itself (reused or merged entries)
            write, self.pending = self.pending, None
            return write(self, key_states, value_states)
        n = key_states.shape[-2]
        new = torch.arange(self.logical, self.logical + n, device=key_states.device)
        self.append_positions(new.expand(key_states.shape[0], 1, -1), n)
        return super().update(key_states, value_states, *args, **kwargs)

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append as a plain ``DynamicLayer`` does, positions left to the caller (a ``pending`` writer)."""
        return super().update(key_states, value_states)

    def append_positions(self, new: torch.Tensor, advance: int) -> None:
        if self.positions is None:
            self.positions = new
        else:
            heads = max(self.positions.shape[1], new.shape[1])
            self.positions = torch.cat([self.positions.expand(-1, heads, -1), new.expand(-1, heads, -1)], dim=2)
        self.logical += advance

    def get_seq_length(self) -> int:
        return self.logical

    def keep(self, index: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep the stored entries ``index`` ``[B, 1|Hkv, k]`` (ascending); ``valid`` False marks empty slots."""
        b, h, d = self.keys.shape[0], self.keys.shape[1], self.keys.shape[-1]
        full = index.expand(b, h, -1)
        self.keys = self.keys.gather(2, full[..., None].expand(-1, -1, -1, d))
        self.values = self.values.gather(2, full[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        pos = self.positions.expand(-1, index.shape[1], -1).gather(2, index)
        self.positions = torch.where(valid, pos, -1)
        self.compressed = True

    def mask(self, query_len: int, heads: int, dtype: torch.dtype, positions: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Additive mask ``[B, 1|heads, query_len, L]`` over stored entries (``positions`` by default): a
        query at logical position p sees valid entries at positions <= p (the queries are the last ones)."""
        pos = self.positions if positions is None else positions
        q = torch.arange(self.logical - query_len, self.logical, device=pos.device)
        allowed = (pos[:, :, None, :] >= 0) & (pos[:, :, None, :] <= q[None, None, :, None])
        if allowed.shape[1] > 1:
            allowed = allowed.repeat_interleave(heads // allowed.shape[1], dim=1)
        zero = torch.zeros((), dtype=dtype, device=pos.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    def kept(self) -> int:
        """Valid stored entries of the fullest sample and head."""
        if self.positions is None:
            return 0
        return int((self.positions >= 0).sum(-1).max())

    def nbytes(self) -> int:
        if not self.is_initialized or self.keys is None:
            return 0
        extra = sum(t.numel() * t.element_size() for t in self.state.values() if isinstance(t, torch.Tensor))
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size() + extra

    def reset(self) -> None:
        super().reset()
        self.positions, self.logical, self.compressed, self.pending, self.state = None, 0, False, None, {}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:  # the legacy spelling (transformers 5.17): the absolute length to keep
            tokens_to_remove -= self.logical
        if tokens_to_remove >= 0:
            return
        super().crop(tokens_to_remove)
        if self.positions is not None:
            self.positions = self.positions[..., :tokens_to_remove]
            self.logical += tokens_to_remove

