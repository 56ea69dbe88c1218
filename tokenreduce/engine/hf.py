"""Applies visual methods' Selections inside an unmodified Hugging Face forward: ``HFEngine`` installs the
hooks and routes each to its job's module (``prefill``, ``reduction``, ``slicing``, ``deepstack``,
``generation``, ``freeze``; ``install`` undoes them all).

Hooks (all scoped to one model instance and removed by ``unpatch``):
- a forward pre-hook on the multimodal base model builds the prompt's TokenLayout;
- a forward pre-hook on every LLM decoder layer runs the method before the layers it acts on,
  merges and compacts the hidden states, and hands the layer its rows' slices of the position
  embeddings (1-D RoPE or 3-D M-RoPE, so kept tokens keep their original positions, unless a
  method asked for contiguous ones on a 1-D RoPE model), of the position ids and of the attention mask;
- an attention function (transformers' AttentionInterface) observing post-RoPE q/k for the
  layers whose importance a method needs;
- reduced layers' cache entries live in ReducedDynamicLayer, which reports the original length.

Threads: what the hooks remember during one call is per thread (``tokenreduce.threads``), so several
threads may run forwards and ``generate`` on one patched model at once; ``remove`` refuses while
any call runs.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from ..methods.base import VisualMethod
from ..models import ModelAdapter
from ..threads import CallCount, PerThread
from .attention import ENGINE_ATTR, wrapped_attention
from .cache import ReducedDynamicLayer, check_reducible
from .composition import check_composition, check_order
from .context import HFMethodContext
from .deepstack import deepstack
from .freeze import FrozenLayers
from .generation import GenerateTracker
from .install import Installation
from .prefill import ForwardState
from .reduction import observe_importance, reduce_rows
from .slicing import cache_layer, cache_of, continuation_mask, slice_kwargs, uses_mrope
from .stats import Record
from .timer import Timer


def _refuse_labels(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    if kwargs.get("labels") is not None:
        raise ValueError("tokenreduce removes prompt tokens, so per-token labels no longer line up with the "
                         "logits; compute losses on the unpatched model (tokenreduce.unpatch)")


RIGHT_PADDING = (
    "tokenreduce: this batch is right-padded (attention_mask has padding after a sample's tokens). Reduced "
    "layers keep each sample's last row as its last prompt token, so right padding would give outputs that "
    "differ from the samples run alone (the unpatched model's generate is wrong there too). Pad on the left: "
    "tokenizer.padding_side = 'left' (processor.tokenizer.padding_side = 'left' for a processor)")


class HFEngine:
    """One method installed on one model; ``remove()`` undoes everything.

    The per-call attributes are :class:`~tokenreduce.threads.PerThread`: each thread running
    the model has its own prefill state, ``generate`` call and statistics.
    """

    state = PerThread()  # ForwardState of this thread's prefill (None while decoding)
    record = PerThread()  # Record of this thread's last prefill
    timer = PerThread()
    stage_notes = PerThread(dict)  # per stage, what it did in this thread's last forward (Stats.stages)

    def __init__(self, model: nn.Module, adapter: ModelAdapter, methods: list[VisualMethod]) -> None:
        self.model, self.adapter, self.methods = model, adapter, methods
        self.name = "+".join(m.name for m in methods)
        self.layers = adapter.layers(model)
        self.num_layers = len(self.layers)
        self.act: dict[int, list[VisualMethod]] = {}  # layer -> the methods that reduce before it, in order
        self.score: dict[int, set[int]] = {}  # layer -> the query counts its importance is taken with
        check_composition(methods)
        for method in methods:
            method.check_model(self.num_layers)
            for layer in sorted(method.act_layers(self.num_layers)):
                self.act.setdefault(layer, []).append(method)  # before a shared layer: in the order given
            for layer in method.score_layers(self.num_layers):
                self.score.setdefault(layer, set()).add(method.n_queries)
        check_order(methods, self.num_layers)
        self.text_config = self.layers[0].self_attn.config
        self.original_attention = self.text_config._attn_implementation
        self.mrope = uses_mrope(self.text_config)
        self.calls = CallCount()
        self.tracker = GenerateTracker(self.calls)  # this thread's generate call (encoded inputs, expansion)
        self.latest: Record | None = None  # the last prefill's record in any thread
        self.installed = Installation()
        self.frozen: FrozenLayers | None = None
        # attention observers: each may compute a layer's attention itself (frozen layers), else None
        self.observers: list[Callable[..., Any]] = []

    # installation ---------------------------------------------------------------------------
    def install(self) -> None:
        base = self.adapter.base_model(self.model)
        self.installed.add_hook(self.model.register_forward_pre_hook(_refuse_labels, with_kwargs=True))
        # first among the base model's pre-hooks; the forward hook runs even when the forward raises
        self.installed.add_hook(base.register_forward_pre_hook(self._on_base, with_kwargs=True, prepend=True))
        self.installed.add_hook(base.register_forward_hook(self._after_base, always_call=True))
        self.tracker.install(self.model, base, self.installed)
        if self.adapter.deepstack:
            self.installed.wrap(self.adapter.language_model(self.model), "_deepstack_process", self._deepstack)
        for i, layer in enumerate(self.layers):
            self.installed.add_hook(layer.register_forward_pre_hook(partial(self._on_layer, i), with_kwargs=True))
            setattr(layer.self_attn, ENGINE_ATTR, self)
        if self.score:
            self.text_config._attn_implementation = wrapped_attention(self.original_attention)
        for method in self.methods:
            undo = method.setup(HFMethodContext(self, method))
            if undo is not None:
                self.installed.add_undo(undo)

    def check_idle(self) -> None:
        """RuntimeError if a forward or generate call runs on the model (see ``tokenreduce.threads``)."""
        self.calls.check_idle()

    def remove(self) -> None:
        """Undo the installation; RuntimeError, and nothing undone, while a call runs on the model."""
        with self.calls.closing():
            self._remove()

    def _remove(self) -> None:
        self.installed.remove()
        for layer in self.layers:
            if getattr(layer.self_attn, ENGINE_ATTR, None) is self:
                delattr(layer.self_attn, ENGINE_ATTR)
        self.text_config._attn_implementation = self.original_attention
        self.state = None

    def freeze(self, layers: set[int]) -> Callable[[], None]:
        """Leave visual rows frozen in ``layers`` during prefill (see ``engine.freeze``); returns the undo."""
        if self.frozen is not None:
            raise ValueError("another method already freezes layers of this model")
        self.frozen = FrozenLayers(self.layers, layers, lambda: self.state)
        self.observers.append(self.frozen.attention)
        self.text_config._attn_implementation = wrapped_attention(self.original_attention)

        def undo() -> None:
            self.observers.remove(self.frozen.attention)
            self.frozen.remove()
            self.frozen = None

        return undo

    def stats(self):
        """What this thread's last prefill did (see :class:`~tokenreduce.engine.stats.Stats`); in a
        thread that ran none, the last prefill of any thread."""
        record = self.record or self.latest
        if record is None:
            raise RuntimeError("no forward pass has run since tokenreduce.patch")
        return record.stats()

    def _deepstack(self, original, hidden: torch.Tensor, visual_pos_masks: torch.Tensor,
                   visual_embeds: torch.Tensor) -> torch.Tensor:
        return deepstack(self.state, original, hidden, visual_pos_masks, visual_embeds)

    # hooks -----------------------------------------------------------------------------------
    def _on_base(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        live = self.calls.enter()  # first: _after_base, which always runs, leaves
        self.tracker.in_forward = True
        cache = cache_of(kwargs)
        if not live:  # unpatched while this forward started (its hooks were taken already)
            self.state = None
            return
        if cache is not None and cache.get_seq_length() > 0:
            self.state = None
            if self.record is not None:
                self.record.decode_steps += 1
            return
        inputs, repeat = self.tracker.inputs({k: v for k, v in kwargs.items() if v is not None})
        if args and "input_ids" not in kwargs:
            inputs["input_ids"] = args[0]
        self.state = None
        layout = self.adapter.build_layout(self.model, inputs, repeat)
        if layout is None:
            return
        if layout.right_padded and any(layout.grids):
            raise ValueError(RIGHT_PADDING)
        self.state = ForwardState(layout, self.mrope)
        if cache is not None and self.state.reducing:
            for layer in getattr(cache, "layers", ()):
                check_reducible(layer)
        self.timer = Timer(layout.kind.device)
        self.record = self.latest = Record(self.name, layout, self.num_layers, self.timer, self.stage_notes)

    def _after_base(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.tracker.in_forward = False
        self.calls.leave()

    def _on_layer(self, idx: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = cache_of(kwargs)
        st = self.state
        if st is None:  # decoding (or a chunk after the prompt): map masks onto reduced caches
            layer = None if cache is None else cache_layer(cache, idx)
            if not isinstance(layer, ReducedDynamicLayer):
                return None
            kwargs["attention_mask"] = continuation_mask(layer, kwargs, hidden)
            return args, kwargs
        if st.reducing and idx in self.act:
            with self.timer:
                for method in self.act[idx]:
                    hidden = reduce_rows(st, self.record, self.stage_notes, method, idx, self.num_layers, hidden)
        self.record.rows[idx] = st.rows
        if st.version == 0:  # nothing reduced yet: the layer runs exactly as in the dense model
            return None
        with self.timer:
            slice_kwargs(st, kwargs, self.original_attention)
            if cache is not None:
                layer = cache_layer(cache, idx)
                if not isinstance(layer, ReducedDynamicLayer):
                    layer = ReducedDynamicLayer.adopt(layer)
                layer.expect(st.rows, st.layout.shape[1], st.padded)
        if args:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    def attend(self, module: nn.Module, backend: Callable[..., Any], query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, mask: torch.Tensor | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """One attention call of an LLM layer (see ``engine.attention``): importance observed, then the first
        observer that computes the call itself (a frozen layer's active rows), else ``backend``."""
        observe_importance(self.state, self.score, self.timer, module, query, key, kwargs)
        for observer in self.observers:
            out = observer(module, backend, query, key, value, mask, kwargs)
            if out is not None:
                return out
        return backend(module, query, key, value, mask, **kwargs)
