"""KVMethod: the base of cache-stage methods, and the default behaviour most of them share.

A KV method sees the engine at three points: :meth:`begin` before a forward (it may rewrite the
model's inputs or plan a prefill), :meth:`attend` in every attention call of a full-attention layer
(by default: dense attention on a new prompt followed by :meth:`compress`, then the layer's own mask
over what it kept), and :meth:`finish` after the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ...methods.base import Method

if TYPE_CHECKING:
    from ..cache import KVLayer
    from ..engine import Forward, KVEngine
    from ..model import TextParts


@dataclass
class KVMethod(Method):
    """A method run by :class:`tokenreduce.kv.engine.KVEngine`."""

    stages: ClassVar[tuple[str, ...]] = ("cache",)
    engine: ClassVar[str] = "kv"
    text_only: ClassVar[bool] = False  # True: needs token ids and 1-D RoPE (not the LM inside a VLM)

    def check_llm(self, parts: TextParts, is_vlm: bool) -> None:
        """Raise TypeError/ValueError if the method cannot run on this LLM (overrides call this first)."""
        self.check_model(parts.num_layers)
        if self.text_only and is_vlm:
            raise TypeError(f"{self.name} works on text LLMs (token ids in, 1-D RoPE); the language model of a "
                            "vision-language model is supported by snapkv, streamingllm, actqkv and interlayer")

    def install(self, engine: KVEngine) -> None:
        """Extra hooks (added with ``engine.add_handle``) beyond the cache layer and attention function."""

    def uninstall(self, engine: KVEngine) -> None:
        """Undo what :meth:`install` did besides its handles."""

    def note(self, engine: KVEngine, fwd: Forward, record: Any) -> None:
        """Add this method's figures to the prefill's :class:`KVStats`."""

    def begin(self, engine: KVEngine, fwd: Forward) -> None:
        """Before a forward (``fwd.kwargs`` are the model's keyword arguments and may be rewritten)."""

    def finish(self, engine: KVEngine, fwd: Forward, output: Any) -> None:
        """After a forward."""

    def compress(self, engine: KVEngine, index: int, layer: KVLayer, query: torch.Tensor, module: nn.Module,
                 fwd: Forward) -> None:
        """After dense attention over a new prompt: shrink ``layer`` (default: keep everything)."""

    def attend(self, engine: KVEngine, index: int, layer: KVLayer, module: nn.Module, query: torch.Tensor,
               key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, real, kwargs: dict[str, Any]):
        fwd = engine.fwd
        if fwd.prefill and not layer.compressed:
            out = real(module, query, key, value, mask, **kwargs)
            with engine.timer():
                self.compress(engine, index, layer, query, module, fwd)
            return out
        if layer.compressed:
            with engine.timer():
                mask = layer.mask(query.shape[2], query.shape[1], query.dtype)
        return real(module, query, key, value, mask, **kwargs)
