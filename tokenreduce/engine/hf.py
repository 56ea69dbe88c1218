"""Applies a method's Selections inside an unmodified Hugging Face forward.

Hooks (all scoped to one model instance and removed by ``unpatch``):
- a forward pre-hook on the multimodal base model builds the prompt's TokenLayout;
- a forward pre-hook on every LLM decoder layer runs the method before the layers it acts on,
  merges and compacts the hidden states, and hands the layer its rows' slices of the position
  embeddings (1-D RoPE or 3-D M-RoPE, so kept tokens keep their original positions), of the
  position ids and of the attention mask;
- an attention function (transformers' AttentionInterface) observing post-RoPE q/k for the
  layers whose importance a method needs;
- reduced layers' cache entries live in ReducedDynamicLayer, which reports the original length.

Threads: what the hooks remember during one call is per thread (``tokenreduce.threads``), so several
threads may run forwards and ``generate`` on one patched model at once; ``remove`` refuses while
any call runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial, wraps
from typing import Any

import torch
from torch import nn

from ..layout import PAD, TokenLayout
from ..methods.base import Step, VisualMethod
from ..models import ModelAdapter
from ..ops import compaction_index, last_query_importance, take_rows
from ..ops.merge import merge_compact
from ..threads import CallCount, PerThread
from .attention import ENGINE_ATTR, wrapped_attention
from .cache import ReducedDynamicLayer, check_reducible
from .composition import check_composition, check_order
from .context import HFMethodContext
from .freeze import FrozenLayers
from .masks import select_mask
from .stats import Record
from .timer import Timer


class ForwardState:
    """The current rows of one prefill: original index (-1 = padding), size, version."""

    def __init__(self, layout: TokenLayout) -> None:
        self.layout = layout
        length = layout.shape[1]
        ar = torch.arange(length, device=layout.kind.device).expand(layout.shape[0], -1)
        self.rows = self.owner = torch.where(layout.valid, ar, -1)
        self.size = torch.ones(layout.shape, dtype=torch.float32, device=layout.kind.device)
        self.padded = layout.padded
        self.version = 0
        self._derive()
        self.memo: dict[str, Any] = {}
        self.importance: dict[int, tuple[int, torch.Tensor]] = {}  # query count -> (rows version, scores)
        self.visual_in = layout.visual.sum(dim=1)
        items = [spec for sample in layout.grids for spec in sample]
        self.max_frames = max((spec.frames for spec in items), default=1)
        self.max_cells = max((spec.cells for spec in items), default=1)
        self.max_items = max((len(sample) for sample in layout.grids), default=1)
        self.reducing = bool(items)

    def cached(self, kind: str, obj: Any, make) -> Any:
        """``make(obj)``, computed once per rows version and source object."""
        hit = self.slices.get((kind, id(obj)))
        if hit is not None and hit[0] is obj:
            return hit[1]
        out = make(obj)
        self.slices[(kind, id(obj))] = (obj, out)
        return out

    def set_rows(self, rows: torch.Tensor, size: torch.Tensor, padded: bool, owner: torch.Tensor) -> None:
        """New current rows; ``owner`` ``[B, L_orig]`` is the current row each original token lives in
        (-1: dropped)."""
        self.rows, self.size, self.padded, self.owner = rows, size, padded, owner
        self.version += 1
        self._derive()

    def _derive(self) -> None:
        """What every hook reads about the current rows, computed once per version."""
        self.valid, self.index = self.rows >= 0, self.rows.clamp(min=0)
        self.slices: dict[tuple[str, int], tuple[Any, Any]] = {}

    def current(self, field: str) -> torch.Tensor:
        out = getattr(self.layout, field).gather(1, self.index)
        return torch.where(self.valid, out, PAD if field == "kind" else -1)

    def query_rows(self, n: int) -> torch.Tensor:
        """The last ``n`` valid rows of each sample ``[B, n]`` (the question's tokens)."""
        ar = torch.arange(self.rows.shape[1], device=self.rows.device)
        score = torch.where(self.valid, ar, -1)
        top = score.topk(min(n, score.shape[1]), dim=1).values.sort(dim=1).values
        return torch.where(top >= 0, top, top.max(dim=1, keepdim=True).values).clamp(min=0)


def _cache_of(kwargs: dict[str, Any]):
    return kwargs.get("cache", kwargs.get("past_key_values"))


def _cache_layer(cache, idx: int):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"tokenreduce needs a transformers Cache with per-layer storage; got {type(cache).__name__}")
    while len(layers) <= idx:
        if getattr(cache, "layer_class_to_replicate", None) is None:
            raise ValueError("tokenreduce: the cache has no layer for layer "
                             f"{idx} and cannot create one ({type(cache).__name__})")
        layers.append(cache.layer_class_to_replicate())
    return layers[idx]


_MISSING = object()


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
    generation = PerThread()  # visual inputs this thread's generate() encoded, its expand size
    recording = PerThread(bool)
    in_forward = PerThread(bool)
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
        self.calls = CallCount()
        self.latest: Record | None = None  # the last prefill's record in any thread
        self.handles: list[Any] = []
        self.frozen: FrozenLayers | None = None
        # attention observers: each may compute a layer's attention itself (frozen layers), else None
        self.observers: list[Callable[..., Any]] = []
        self.undo: list[Any] = []  # what methods' setup() installed, undone last-in first-out
        self.wrapped: list[tuple[nn.Module, str, Any]] = []  # (object, attribute, its previous instance value)

    # installation ---------------------------------------------------------------------------
    def install(self) -> None:
        base = self.adapter.base_model(self.model)
        self.handles.append(self.model.register_forward_pre_hook(_refuse_labels, with_kwargs=True))
        # first among the base model's pre-hooks; the forward hook runs even when the forward raises
        self.handles.append(base.register_forward_pre_hook(self._on_base, with_kwargs=True, prepend=True))
        self.handles.append(base.register_forward_hook(self._after_base, always_call=True))
        for name in ("get_image_features", "get_video_features"):
            self._record_calls(base, name)
        self.wrap(self.model, "generate", self._generate)
        self.wrap(self.model, "_expand_inputs_for_generation", self._expand)
        if self.adapter.deepstack:
            self.wrap(self.adapter.language_model(self.model), "_deepstack_process", self._deepstack)
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(partial(self._on_layer, i), with_kwargs=True))
            setattr(layer.self_attn, ENGINE_ATTR, self)
        if self.score:
            self.text_config._attn_implementation = wrapped_attention(self.original_attention)
        for method in self.methods:
            undo = method.setup(HFMethodContext(self, method))
            if undo is not None:
                self.undo.append(undo)

    def check_idle(self) -> None:
        """RuntimeError if a forward or generate call runs on the model (see ``tokenreduce.threads``)."""
        self.calls.check_idle()

    def remove(self) -> None:
        """Undo the installation; RuntimeError, and nothing undone, while a call runs on the model."""
        with self.calls.closing():
            self._remove()

    def _remove(self) -> None:
        while self.undo:
            self.undo.pop()()
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for obj, name, previous in reversed(self.wrapped):  # wrappers may stack: undo the latest first
            if previous is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
        self.wrapped.clear()
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

    def _generate(self, original, *args: Any, **kwargs: Any):
        """``generate`` (transformers >= 5.2x) encodes images and videos once, before any forward, and
        then drops their grids and pixels from the forwards' arguments: keep what it encoded, and by
        how much it expanded the batch (beams, num_return_sequences), for the whole call."""
        with self.calls.call() as live:
            if not live:  # the patch was removed while this call started: it runs unpatched
                return original(*args, **kwargs)
            outer, self.generation = self.generation, {"visual": {}, "expand": 1}
            try:
                return original(*args, **kwargs)
            finally:
                self.generation = outer

    def _expand(self, original, *args: Any, **kwargs: Any):
        if self.generation is not None:
            self.generation["expand"] = kwargs.get("expand_size", args[0] if args else 1)
        return original(*args, **kwargs)

    def _record_calls(self, base: nn.Module, name: str) -> None:
        """Remember the tensors ``generate`` passes to ``base.<name>`` before its forwards (see
        ``_generate``); calls made inside a forward or outside ``generate`` are not recorded."""
        if getattr(base, name, None) is None:
            return
        signature = inspect.signature(getattr(base, name))

        def recorder(fn, *args: Any, **kwargs: Any):
            # an encoder calling another (Qwen3-VL: videos through the image path) records once
            if self.recording or self.in_forward or self.generation is None:
                return fn(*args, **kwargs)
            bound = signature.bind_partial(*args, **kwargs)
            seen = {k: v for k, v in bound.arguments.items() if isinstance(v, torch.Tensor)}
            self.generation["visual"].update(seen)
            self.recording = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.recording = False

        self.wrap(base, name, recorder)

    def wrap(self, obj: nn.Module, name: str, wrapper: Callable[..., Any]) -> None:
        """Shadow ``obj.<name>`` on this instance by ``wrapper(original, *args, **kwargs)``; undone by
        ``remove``. The signature is kept: ``generate()`` inspects it to pick encoder arguments."""
        original = getattr(obj, name)
        self.wrapped.append((obj, name, obj.__dict__.get(name, _MISSING)))
        setattr(obj, name, wraps(original)(partial(wrapper, original)))

    def _deepstack(self, original, hidden: torch.Tensor, visual_pos_masks: torch.Tensor,
                   visual_embeds: torch.Tensor) -> torch.Tensor:
        """Qwen3-VL adds per-token vision features to the visual rows of its first layers. After a
        reduction, each current row gets the mean of its original tokens' features (the merged
        row is the size-weighted mean of its members, so this is what the dense rows would sum to)."""
        st = self.state
        if st is None or st.version == 0:
            return original(hidden, visual_pos_masks, visual_embeds)
        bsz, length, dim = hidden.shape
        mask = visual_pos_masks.to(hidden.device)
        full = torch.zeros(*mask.shape, dim, dtype=torch.float32, device=hidden.device)
        full[mask] = visual_embeds.to(full)
        owner = st.owner.to(hidden.device)
        idx = torch.where(owner >= 0, owner, length)  # dropped tokens land in a spare row
        total = torch.zeros(bsz, length + 1, dim, dtype=torch.float32, device=hidden.device)
        total.scatter_add_(1, idx[..., None].expand(-1, -1, dim), full)
        count = torch.zeros(bsz, length + 1, device=hidden.device).scatter_add_(1, idx, mask.float())
        return hidden + (total[:, :length] / count[:, :length, None].clamp(min=1)).to(hidden.dtype)

    # hooks -----------------------------------------------------------------------------------
    def _on_base(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        live = self.calls.enter()  # first: _after_base, which always runs, leaves
        self.in_forward = True
        cache = _cache_of(kwargs)
        if not live:  # unpatched while this forward started (its hooks were taken already)
            self.state = None
            return
        if cache is not None and cache.get_seq_length() > 0:
            self.state = None
            if self.record is not None:
                self.record.decode_steps += 1
            return
        given = {k: v for k, v in kwargs.items() if v is not None}
        recorded = self.generation["visual"] if self.generation else {}
        # recorded inputs predate generate()'s batch expansion; the forward's own are expanded already
        repeat = self.generation["expand"] if set(recorded) - set(given) else 1
        inputs = {**recorded, **given}
        if args and "input_ids" not in kwargs:
            inputs["input_ids"] = args[0]
        self.state = None
        layout = self.adapter.build_layout(self.model, inputs, repeat)
        if layout is None:
            return
        if layout.right_padded and any(layout.grids):
            raise ValueError(RIGHT_PADDING)
        self.state = ForwardState(layout)
        if cache is not None and self.state.reducing:
            for layer in getattr(cache, "layers", ()):
                check_reducible(layer)
        self.timer = Timer(layout.kind.device)
        self.record = self.latest = Record(self.name, layout, self.num_layers, self.timer, self.stage_notes)

    def _after_base(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.in_forward = False
        self.calls.leave()

    def _on_layer(self, idx: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = _cache_of(kwargs)
        st = self.state
        if st is None:  # decoding (or a chunk after the prompt): map masks onto reduced caches
            layer = None if cache is None else _cache_layer(cache, idx)
            if not isinstance(layer, ReducedDynamicLayer):
                return None
            kwargs["attention_mask"] = self._continuation_mask(layer, kwargs, hidden)
            return args, kwargs
        if st.reducing and idx in self.act:
            with self.timer:
                for method in self.act[idx]:
                    hidden = self._reduce(method, idx, hidden)
        self.record.rows[idx] = st.rows
        if st.version == 0:  # nothing reduced yet: the layer runs exactly as in the dense model
            return None
        with self.timer:
            self._slice_kwargs(kwargs)
            if cache is not None:
                layer = _cache_layer(cache, idx)
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
        self.observe_attention(module, query, key, kwargs)
        for observer in self.observers:
            out = observer(module, backend, query, key, value, mask, kwargs)
            if out is not None:
                return out
        return backend(module, query, key, value, mask, **kwargs)

    def observe_attention(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                          kwargs: dict[str, Any]) -> None:
        st = self.state
        if st is None or not st.reducing or module.layer_idx not in self.score:
            return
        if key.shape[2] != st.rows.shape[1]:
            return
        with self.timer:
            scaling = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
            for n in self.score[module.layer_idx]:
                q_index = st.query_rows(n).to(query.device)
                scores = last_query_importance(query, key, q_index, st.valid.to(key.device), scaling)
                st.importance[n] = (st.version, scores.to(st.rows.device))

    # work ------------------------------------------------------------------------------------
    def _reduce(self, method: VisualMethod, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        st = self.state
        version, importance = st.importance.get(method.n_queries, (-1, None))
        if version != st.version:
            importance = None
        if importance is None and idx - 1 in method.score_layers(self.num_layers):
            raise RuntimeError(f"tokenreduce: layer {idx - 1} produced no importance scores; its attention did not "
                               "run through tokenreduce's attention function (was attn_implementation changed?)")
        step = Step(layer=idx, num_layers=self.num_layers, hidden=hidden, rows=st.rows, size=st.size,
                    kind=st.current("kind"), item=st.current("item"), frame=st.current("frame"),
                    cell=st.current("cell"), importance=importance, visual_in=st.visual_in,
                    max_frames=st.max_frames, max_cells=st.max_cells, max_items=st.max_items,
                    memo=st.memo.setdefault(method.name, {}))
        selection = method.reduce(step)
        if selection is None:
            return hidden
        if selection.notes is not None:
            self.stage_notes[method.name] = selection.notes
        rows_ar = step.row_index()
        dest = torch.where(st.valid, selection.dest.to(st.rows.device), -1)
        # every sample's last row is its last prompt token, whose logits generate() reads: never removed
        dest[:, -1] = torch.where(st.valid[:, -1], rows_ar[:, -1], -1)
        keep = dest == rows_ar
        merged = (dest >= 0) & ~keep
        dropped = st.valid & (dest < 0)
        counts = keep.sum(dim=1)
        # the one host sync of a reduction step: is there work, and how long is the result
        any_merged, any_dropped, low, high = torch.stack(
            [merged.any(), dropped.any(), counts.min(), counts.max()]).tolist()
        if not any_merged and not any_dropped:
            return hidden
        note = self.record.method_steps.setdefault(method.name, {})
        note[idx] = (st.rows.shape[1], high)  # rows (longest sample) before and after this step
        index, valid, target, padded = compaction_index(keep, (low, high), counts)
        if any_merged:  # size-weighted merge fused with the gather of the kept rows (one pass)
            hidden, size = merge_compact(hidden, st.size, torch.where(dest >= 0, dest, rows_ar).to(hidden.device),
                                         index.to(hidden.device))
        else:
            hidden, size = take_rows(hidden, index.to(hidden.device), 1), st.size.gather(1, index.to(st.size.device))
        rows = torch.where(valid, st.rows.gather(1, index), -1)
        lives_in = torch.where(st.owner >= 0, dest.gather(1, st.owner.clamp(min=0)), -1)
        owner = torch.where(lives_in >= 0, target.gather(1, lives_in.clamp(min=0)), -1)
        old = st.version
        st.set_rows(rows, size.to(st.size.device), padded, owner)
        # the previous layer's scores, carried to the kept rows for a method reducing next at this layer
        st.importance = {n: (st.version, scores.gather(1, index.to(scores.device)))
                         for n, (version, scores) in st.importance.items() if version == old}
        return hidden

    def _slice_kwargs(self, kwargs: dict[str, Any]) -> None:
        st = self.state
        index = st.index
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            kwargs["position_embeddings"] = st.cached(
                "pe", pe, lambda p: tuple(take_rows(t, index.to(t.device), -2) for t in p))
        pid = kwargs.get("position_ids")
        if pid is not None:
            kwargs["position_ids"] = st.cached("pid", pid, lambda p: take_rows(p, index.to(p.device), -1))
        mask = kwargs.get("attention_mask")
        if mask is None or isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = st.cached("mask", mask, self._prefill_mask)
        else:
            raise ValueError(f"tokenreduce cannot reduce with attention masks of type {type(mask).__name__}; "
                             "use attn_implementation='sdpa' or 'eager'")

    def _prefill_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        st = self.state
        dev = mask.device if mask is not None else st.rows.device
        out = select_mask(mask, st.index.to(dev), st.valid.to(dev), st.rows.to(dev), past=0, padded=st.padded)
        if out is not None and self.original_attention.startswith("flash"):
            raise ValueError("tokenreduce: a padded or ragged batch needs attn_implementation='sdpa' or 'eager'")
        return out

    def _continuation_mask(self, layer: ReducedDynamicLayer, kwargs: dict[str, Any], hidden: torch.Tensor):
        mask = kwargs.get("attention_mask")
        bsz, q_len = hidden.shape[:2]
        if mask is None and q_len == 1 and not layer.padded:
            return None  # one new token attends to every stored row: no mask, no sync
        dev = mask.device if isinstance(mask, torch.Tensor) else hidden.device
        past = layer.logical_length
        new = torch.arange(past, past + q_len, device=dev).expand(bsz, -1)
        k_pos = torch.cat([layer.positions.to(dev), new], dim=1)
        q_idx = torch.arange(q_len, device=dev).expand(bsz, -1)
        return select_mask(mask, q_idx, torch.ones_like(q_idx, dtype=torch.bool), k_pos, past, padded=layer.padded)
