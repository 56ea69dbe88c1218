"""What a cache (KV) method's hooks receive instead of the engine: the forward in flight (:class:`KVForward`),
one attention call (:class:`AttentionCall`) and, at installation, the model (:class:`KVInstall`).

The KV engine (:mod:`tokenreduce.kv.engine`) builds these; the methods (:mod:`tokenreduce.kv.methods`) import
only this module, so neither side imports the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .model import TextParts
from .stats import KVStats

if TYPE_CHECKING:  # types only: transformers' cache and attention code loads when an engine installs
    from ..hooks.attention import Backend
    from .cache import KVLayer


@dataclass
class KVForward:
    """One forward of the patched model: whether it starts a new prompt, its keyword arguments (a method's
    :meth:`begin` may rewrite them), the cache, the prompt's length and which of its tokens are real
    (``valid`` ``[B, L]``, False for padding; None: all), the LLM's parts and full-attention layers, the
    statistics this forward adds to (``record``: the new prefill's, or the decoded prompt's) and a memo
    the method keeps for the forward."""

    prefill: bool
    kwargs: dict[str, Any]
    cache: Any
    length: int
    valid: torch.Tensor | None
    parts: TextParts
    full: list[int]
    record: KVStats
    fingerprint: Callable[[], str]  # the model's (:mod:`tokenreduce.kv.fingerprint`), taken once when first asked
    memo: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # host time in the method's own work (KVStats.prefill_ms / decode_ms)

    @contextmanager
    def timer(self) -> Iterator[None]:
        """Count the enclosed work as the method's own time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def valid_rows(self, like: torch.Tensor) -> torch.Tensor:
        """``valid``, or all-true ``[B, L]`` for the cache entries ``like`` ``[B, H, L, d]``."""
        if self.valid is not None:
            return self.valid
        return torch.ones(like.shape[0], like.shape[2], dtype=torch.bool, device=like.device)


@dataclass
class AttentionCall:
    """One attention call of a full-attention layer ``index``: its cache ``layer``, the attention ``module``,
    the post-RoPE ``query``/``key``/``value`` (``key``/``value``: everything the layer stores), the model's
    ``mask``, the real backend (SDPA or eager) and its keyword arguments."""

    index: int
    layer: KVLayer
    module: nn.Module
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    real: Backend
    kwargs: dict[str, Any]

    def run(self, mask: torch.Tensor | None, key: torch.Tensor | None = None, value: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, Any]:
        """The real attention of this call's queries with ``mask`` (over ``key``/``value``, default the call's)."""
        key = self.key if key is None else key
        value = self.value if value is None else value
        return self.real(self.module, self.query, key, value, mask, **self.kwargs)


class KVInstall(Protocol):
    """The patched model as a method's :meth:`install` sees it; what it adds is undone by ``unpatch``."""

    parts: TextParts
    architecture: str  # the model's class name (profiles record it)

    @property
    def fingerprint(self) -> str:
        """What decides this model's keys and values (:mod:`tokenreduce.kv.fingerprint`), taken once."""
        ...

    def add_hook(self, handle: RemovableHandle) -> None:
        """Remove ``handle`` on unpatch."""
        ...

    def current(self) -> KVForward | None:
        """The forward in flight on this thread (None outside one, or in one that started unpatched)."""
        ...
