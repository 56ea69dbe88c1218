"""KVEngine: runs one cache-stage method on a transformers LLM through a cache layer and an attention function.

Installed by ``tokenreduce.patch``: a forward pre-hook on the model adopts the cache's full-attention
layers as :class:`KVLayer` (creating the ``DynamicCache`` when the caller passed none) and lets the
method plan the forward; the registered ``tokenreduce_kv_<backend>`` attention function hands every
attention call to the method. ``remove`` restores the attention implementation and drops every hook.

Threads may share one patched model: per-forward state is thread-local, and ``remove`` (so ``patch`` and
``unpatch``) refuses while a forward or ``generate`` call runs on the model in any thread, rather than pulling
hooks from under it (:class:`tokenreduce.threads.CallCount`, shared with the visual engine).
"""

from __future__ import annotations

import inspect
import threading
from functools import cached_property, wraps
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..hooks import ENGINE_ATTR, KV_ATTR
from ..hooks.attention import Backend
from ..hooks.cache import grow_layers
from ..threads import CallCount, PerThread
from .attention import kv_attention
from .cache import KVLayer
from .context import AttentionCall, KVForward
from .fingerprint import fingerprint
from .methods.base import CacheMethod
from .model import text_parts
from .stats import KVStats


class KVEngine:
    """One KV method installed on one model. ``record`` (what :meth:`stats` returns) is per thread, so a
    request's thread reads its own prefill's statistics; ``latest`` is the last prefill of any thread."""

    record = PerThread()

    def __init__(self, model: nn.Module, methods: list[CacheMethod]) -> None:
        if len(methods) != 1:
            raise ValueError(f"KV methods {[m.name for m in methods]} cannot be composed yet; patch one of them")
        self.model, self.method = model, methods[0]
        self.parts = text_parts(model)
        self.architecture = type(model).__name__
        self.is_vlm = getattr(model.config, "vision_config", None) is not None
        if any(getattr(layer.self_attn, ENGINE_ATTR, None) is not None for layer in self.parts.layers):
            raise ValueError(f"{self.method.name} cannot be composed with visual-token methods yet; patch it alone")
        self.method.check_llm(self.parts, self.is_vlm)
        self.full = self.parts.full_attention_layers()
        self.original_attention = self.parts.config._attn_implementation
        self.attention_name = kv_attention(self.original_attention)  # validates the backend
        self.handles: list[Any] = []
        self.positional = [p for p in inspect.signature(model.forward).parameters if p not in ("args", "kwargs")]
        self.local = threading.local()  # the forward in flight, per thread (a server may share one model)
        self.latest: KVStats | None = None
        self.calls = CallCount()  # forwards and generate calls running on the model, all threads
        self.wrapped_generate = False

    @cached_property
    def fingerprint(self) -> str:
        """What decides this model's keys and values (:mod:`tokenreduce.kv.fingerprint`), taken once."""
        return fingerprint(self.parts)

    # installation ---------------------------------------------------------------------------
    def install(self) -> None:
        self.handles.append(self.model.register_forward_pre_hook(self._before, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._after, with_kwargs=True))
        self.handles.append(self.model.register_forward_hook(self._leave, always_call=True))
        self._wrap_generate()
        for i in self.full:
            setattr(self.parts.layers[i].self_attn, KV_ATTR, self)
        self.parts.config._attn_implementation = self.attention_name
        self.method.install(self)  # as KVInstall: parts, architecture, fingerprint, add_hook, current

    def _wrap_generate(self) -> None:
        """Count a whole ``generate`` as one call, so that nobody re-patches between its forwards."""
        original = getattr(self.model, "generate", None)
        if original is None or "generate" in vars(self.model):
            return

        @wraps(original)
        def generate(*args: Any, **kwargs: Any):
            with self.calls.call():
                return original(*args, **kwargs)

        self.model.generate = generate
        self.wrapped_generate = True

    def check_idle(self) -> None:
        """RuntimeError if a forward or generate call runs on the model (in any thread)."""
        self.calls.check_idle()

    def remove(self) -> None:
        """Undo the installation; RuntimeError, and nothing undone, while a call runs on the model (a call
        that starts meanwhile waits, then runs unpatched)."""
        with self.calls.closing():
            self._remove()

    def _remove(self) -> None:
        if self.wrapped_generate:
            del self.model.generate
            self.wrapped_generate = False
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.method.uninstall(self)
        for layer in self.parts.layers:
            if getattr(layer.self_attn, KV_ATTR, None) is self:
                delattr(layer.self_attn, KV_ATTR)
        self.parts.config._attn_implementation = self.original_attention
        self.fwd = None

    @property
    def fwd(self) -> KVForward | None:
        return getattr(self.local, "fwd", None)

    @fwd.setter
    def fwd(self, value: KVForward | None) -> None:
        self.local.fwd = value

    def current(self) -> KVForward | None:
        """The forward in flight on this thread."""
        return self.fwd

    def add_hook(self, handle: Any) -> None:
        self.handles.append(handle)

    # forward ------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        if not self.calls.enter():  # the patch was removed while this forward started: it runs unpatched
            self.fwd = None
            return None
        kwargs = dict(kwargs)
        if args:  # positional arguments become keywords, so methods see one spelling
            kwargs.update(zip(self.positional, args, strict=False))
            args = ()
        name = self.parts.cache_kwarg
        other = "past_key_values" if name == "cache" else "cache"
        cache = kwargs.get(name) if kwargs.get(name) is not None else kwargs.pop(other, None)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.parts.config, "use_cache", True)
        if cache is None and use_cache:
            cache = DynamicCache(config=self.model.config)
        if cache is not None:
            kwargs[name] = cache
            self._adopt(cache)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        length = (ids if ids is not None else embeds).shape[1]
        prefill = cache is None or cache.get_seq_length() == 0
        mask = kwargs.get("attention_mask")
        valid = mask.bool() if prefill and isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
        if prefill:
            record = KVStats(self.method.name)
        else:
            if self.record is None:  # decoding a cache this thread did not prefill
                self.record = KVStats(self.method.name)
            record = self.record
        fwd = self.fwd = KVForward(prefill, kwargs, cache, length, valid, self.parts, self.full, record,
                                        lambda: self.fingerprint)
        with fwd.timer():
            self.method.begin(fwd)
        return args, fwd.kwargs

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Runs after every forward, also one that raised (``always_call``)."""
        self.calls.leave()

    def _adopt(self, cache: Any) -> None:
        layers = grow_layers(cache, self.parts.num_layers, "tokenreduce's KV methods")
        for i in self.full:
            KVLayer.adopt(layers[i])

    def _after(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        fwd = self.fwd
        if fwd is None:
            return
        with fwd.timer():
            self.method.finish(fwd, output)
        record = fwd.record
        if fwd.prefill:
            self.method.note(fwd, record)
            record.prefill_ms = fwd.seconds * 1e3
            self.record = self.latest = record
        else:
            record.decode_ms += fwd.seconds * 1e3
            record.decode_steps += 1
        self._measure(fwd.cache)

    def _measure(self, cache: Any) -> None:
        if cache is None:
            return
        layers = [cache.layers[i] for i in range(self.parts.num_layers)]
        self.record.logical_length = cache.get_seq_length()
        self.record.layer_entries = [layer.kept() if isinstance(layer, KVLayer) else layer.get_seq_length()
                                     for layer in layers]
        held, dense = 0, 0
        for layer in layers:
            if not getattr(layer, "is_initialized", False) or layer.keys is None:
                continue
            held += layer.nbytes() if isinstance(layer, KVLayer) else (
                layer.keys.numel() * layer.keys.element_size() * 2)
            b, h, _, d = layer.values.shape
            dense += 2 * b * h * d * layer.values.element_size() * self.record.logical_length
        self.record.kv_bytes, self.record.dense_kv_bytes = held, dense

    # attention ------------------------------------------------------------------------------
    def attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, real: Backend, kwargs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        """One attention call (from :func:`tokenreduce.kv.attention.kv_attention`): the method's, in a layer
        this forward's cache holds as a :class:`KVLayer`, else the real backend's."""
        fwd = self.fwd
        layer = fwd.cache.layers[module.layer_idx] if fwd is not None and fwd.cache is not None else None
        if not isinstance(layer, KVLayer):
            return real(module, query, key, value, mask, **kwargs)
        call = AttentionCall(module.layer_idx, layer, module, query, key, value, mask, real, kwargs)
        return self.method.attend(fwd, call)

    def stats(self) -> KVStats:
        """This thread's last prefill; in a thread that ran none, the last of any thread (empty before any)."""
        return self.record or self.latest or KVStats(self.method.name)
