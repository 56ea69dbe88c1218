"""CacheMethod: the base of cache-stage methods, and the default behaviour most of them share.

A cache method shares only its options and registration with visual methods (:class:`tokenreduce.methods.base.
Method`). It sees the model through :mod:`tokenreduce.kv.context`, never the engine: :meth:`install` gets the
model (:class:`KVInstall`) to add hooks; per forward, :meth:`begin` (it may rewrite the model's inputs or plan
a prefill), :meth:`attend` in every attention call of a full-attention layer (by default: dense attention on a
new prompt followed by :meth:`compress`, then the layer's own mask over what it kept), :meth:`finish` after
the forward and :meth:`note` for a prefill's statistics, each with the forward's :class:`KVForward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...methods.base import Method
from ..context import AttentionCall, KVForward, KVInstall
from ..model import TextParts
from ..stats import KVStats


@dataclass
class CacheMethod(Method):
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

    def install(self, ctx: KVInstall) -> None:
        """Extra hooks (added with ``ctx.add_hook``) beyond the cache layer and attention function."""

    def uninstall(self, ctx: KVInstall) -> None:
        """Undo what :meth:`install` did besides its hooks."""

    def note(self, fwd: KVForward, record: KVStats) -> None:
        """Add this method's figures to the prefill's :class:`KVStats`."""

    def begin(self, fwd: KVForward) -> None:
        """Before a forward (``fwd.kwargs`` are the model's keyword arguments and may be rewritten)."""

    def finish(self, fwd: KVForward, output: Any) -> None:
        """After a forward."""

    def compress(self, fwd: KVForward, call: AttentionCall) -> None:
        """After dense attention over a new prompt: shrink ``call.layer`` (default: keep everything)."""

    def attend(self, fwd: KVForward, call: AttentionCall) -> tuple[torch.Tensor, Any]:
        """The attention of ``call`` (the engine calls it only for a layer it adopted, inside a forward)."""
        layer = call.layer
        if fwd.prefill and not layer.compressed:
            out = call.run(call.mask)
            with fwd.timer():
                self.compress(fwd, call)
            return out
        mask = call.mask
        if layer.compressed:
            with fwd.timer():
                mask = layer.mask(call.query.shape[2], call.query.shape[1], call.query.dtype)
        return call.run(mask)
