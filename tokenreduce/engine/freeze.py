"""Frozen layers (ShortV's mechanism): in chosen LLM layers the visual rows of a prefill skip the
layer's work (attention queries, attention output projection, MLP) and pass through unchanged,
while their hidden states still supply keys and values to the other rows (and to the cache).

Done with hooks that really shrink the work: the attention function runs only the active rows'
queries (against every key), the output projection and the MLP see only active rows, and the
frozen rows' outputs are zeros, so the residual stream leaves them as they were. The query
projection still runs on all rows (RoPE is applied to queries and keys together); in a 7B layer
that is about 4% of the work.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
from torch import nn

from ..layout import IMAGE
from ..ops import compaction_index, take_rows
from ..threads import PerThread
from .masks import select_mask


class Active(NamedTuple):
    """The rows a frozen layer computes: ``index`` ``[B, La]`` into the current rows, ``valid``."""

    index: torch.Tensor
    valid: torch.Tensor
    length: int  # current rows


def _expand(out: torch.Tensor, active: Active, dim: int) -> torch.Tensor:
    """``out`` computed for the active rows, put back among all rows along ``dim`` (zeros elsewhere)."""
    dim = dim % out.ndim
    shape = list(out.shape)
    shape[dim] = active.length + 1
    full = out.new_zeros(shape)
    idx = torch.where(active.valid, active.index, active.length).to(out.device)
    idx = idx.view([1] * (dim - 1) + list(idx.shape) + [1] * (out.ndim - dim - 1)).expand(out.shape)
    return full.scatter_(dim, idx, out).narrow(dim, 0, active.length)


class FrozenLayers:
    """Installs the freeze on ``layers`` of the LLM layers ``blocks``; ``remove()`` undoes it. ``prefill()``
    is the running thread's prefill state (None while decoding); :meth:`attention` is an attention observer
    of the engine (``HFEngine.attend``)."""

    active = PerThread()  # Active rows of the frozen layer this thread is running, else None
    _cache = PerThread()  # (forward state, rows version, active) of this thread

    def __init__(self, blocks: nn.ModuleList, layers: set[int], prefill: Callable[[], Any]) -> None:
        bad = sorted(i for i in layers if not 0 <= i < len(blocks))
        if bad:
            raise ValueError(f"cannot freeze layers {bad}: the model has {len(blocks)} LLM layers")
        self.prefill, self.layers = prefill, set(layers)
        self.handles: list[Any] = []
        for i in sorted(layers):
            layer = blocks[i]
            self.handles.append(layer.register_forward_pre_hook(partial(self._enter, i)))
            self.handles.append(layer.register_forward_hook(self._leave))
            for module in (layer.self_attn.o_proj, layer.mlp):
                self.handles.append(module.register_forward_pre_hook(self._shrink))
                self.handles.append(module.register_forward_hook(self._grow))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.active = None

    # hooks -----------------------------------------------------------------------------------------
    def _enter(self, idx: int, module: nn.Module, args: tuple) -> None:
        st = self.prefill()
        self.active = None if st is None else self._active(st)

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.active = None

    def _active(self, st) -> Active | None:
        # the state itself, not its id: a later prefill's state may reuse a freed one's id
        if self._cache is not None and self._cache[0] is st and self._cache[1] == st.version:
            return self._cache[2]
        visual = st.current("kind") >= IMAGE
        keep = st.valid & ~visual
        index, valid, _, _ = compaction_index(keep)
        active = None if index.shape[1] == keep.shape[1] else Active(index, valid, keep.shape[1])
        self._cache = (st, st.version, active)
        return active

    def _shrink(self, module: nn.Module, args: tuple):
        if self.active is None:
            return None
        return (take_rows(args[0], self.active.index.to(args[0].device), 1), *args[1:])

    def _grow(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if self.active is None:
            return None
        return _expand(output, self.active, 1)

    def attention(self, module: nn.Module, backend: Callable, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]):
        """The layer's attention for the active rows' queries only; None when this layer is not frozen
        now (decoding, another layer, nothing visual)."""
        active = self.active
        if active is None or module.layer_idx not in self.layers or query.shape[2] != active.length:
            return None
        dev = query.device
        index, valid = active.index.to(dev), active.valid.to(dev)
        rows = torch.arange(active.length, device=dev).expand(index.shape[0], -1)
        k_pos = torch.where(self.prefill().valid.to(dev), rows, -1) if key.shape[2] == active.length else \
            torch.arange(key.shape[2], device=dev).expand(index.shape[0], -1)
        mask = select_mask(attention_mask, index, valid, k_pos, past=key.shape[2] - active.length)
        queries = take_rows(query.transpose(1, 2), index, 1).transpose(1, 2)  # [B, H, La, d]
        out, weights = backend(module, queries, key, value, mask, **kwargs)  # out: [B, La, H, d]
        return _expand(out, active, 1), weights
