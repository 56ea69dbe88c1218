"""SemShareKV (arXiv 2509.24832, "Efficient KVCache Sharing for Semantically Similar Prompts via Token-Level LSH
Matching"): reuse the KV cache of a similar earlier prompt, recomputing only the tokens that deviate most.

For a new prompt: token embeddings with RoPE-style position rotation mixed in are sign-hashed
(random hyperplanes, :mod:`tokenreduce.ops.lsh`); the stored prompt of the request's namespace
(``with tokenreduce.namespace(user_id):`` around the call, :mod:`tokenreduce.kv.namespace`) and of the
same model (:mod:`tokenreduce.kv.fingerprint`, or an explicit ``model_id``) with the most tokens within
``max_distance`` of a new token is the reference, and every new token gets its nearest reference
token. Layers up to ``check_layer`` (1) run every token; comparing the check layer's fresh keys and
values with the reference's (re-rotated) ones ranks tokens by deviation (layer 0's KV depends on the
token and position only, so it cannot see a changed context: the check must be at least layer 1).
Every later layer runs only the most deviating ``f_l`` of the prompt (unmatched tokens and the last token always), with
``f_l`` decaying exponentially with depth so that their mean is ``retention``; every other token's
KV in that layer is the reference token's, keys re-rotated by RoPE from the reference position to
the new one. Skipped rows are not run through the layer at all, so the saving is real (the public
reproduction runs every token and overwrites; it also never re-rotates keys).

Deviations from the paper: one check layer ranks deviation (CacheBlend-style); only prompts computed in
full are stored (``save``), so approximate KV is never reused twice; batch size 1 per forward (a
server sends requests one by one, each in its namespace block; the store and the engine are thread-safe).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from ...methods.options import Flag, Fraction, Layer, Number, Text, option
from ..context import AttentionCall, KVForward, KVInstall
from ..model import TextParts, inv_freq, rotate
from ..namespace import current_namespace
from ..stats import KVStats
from ..store import KVStore
from .base import CacheMethod


def mix_positions(embeds: torch.Tensor, scale: float) -> torch.Tensor:
    """Unit token embeddings ``[L, D]`` rotated RoPE-style by position / ``scale`` (base 10000), so that
    the same token far from its place no longer matches while small shifts still do."""
    dim = embeds.shape[-1] - embeds.shape[-1] % 2
    x = torch.nn.functional.normalize(embeds[:, :dim].float(), dim=-1)
    freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    pos = torch.arange(x.shape[0], device=x.device, dtype=torch.float32)[None] / scale
    return rotate(x[None, None], pos, freq)[0, 0]


def paired_hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hamming distance of signature pairs ``a[i]``, ``b[i]`` (int64 words ``[N, W]``) -> ``[N]``."""
    x = a ^ b
    bits = (x[..., None] >> torch.arange(64, device=x.device)) & 1
    return bits.sum(dim=(-1, -2))


def prefer_in_order(sig: torch.Tensor, ref: torch.Tensor, index: torch.Tensor, distance: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Among reference tokens as close as the nearest one, prefer the one that continues the previous
    token's match, then the one at the same position: repeated tokens (the two 1s of "2411") keep
    their own KV instead of all taking the first occurrence's."""
    n, m = sig.shape[0], ref.shape[0]
    for candidate in (torch.arange(n, device=sig.device), torch.cat([index[:1], index[:-1] + 1])):
        ok = candidate < m
        c = candidate.clamp(max=m - 1)
        d = paired_hamming(sig, ref[c])
        better = ok & (d <= distance)
        index, distance = torch.where(better, c, index), torch.where(better, d, distance)
    return index, distance


@dataclass
class Plan:
    """One prefill's reuse: the reference entry, matched indices, rows computed per layer."""

    index: torch.Tensor  # [L] reference token of every new token
    delta: torch.Tensor  # [1, L] new position - reference position
    matched: torch.Tensor  # [L] bool
    fractions: list[float]
    entry: Any
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    deviation: torch.Tensor | None = None


@dataclass
class SemShare(CacheMethod):
    name: ClassVar[str] = "semshare"
    paper: ClassVar[str] = "arXiv 2509.24832 (SemShareKV)"
    description: ClassVar[str] = "reuse a similar earlier prompt's KV (LSH token matching), recompute what deviates"
    text_only: ClassVar[bool] = True
    retired: ClassVar[dict[str, str]] = {
        "namespace": "The namespace is per request now, not per patch: wrap each call in "
                     "`with tokenreduce.namespace(user_id): model.generate(...)` (a patch-wide namespace leaked "
                     "one tenant's prompts to another when requests re-patched a shared model)"}

    store: KVStore | None = None
    require_namespace: bool = option(False, Flag())
    model_id: str | None = option(None, Text(none=True))  # None: fingerprint the weights (kv/fingerprint.py)
    retention: float = option(0.3, Fraction())
    decay: float = option(0.7, Fraction())
    max_distance: float = option(0.1, Number(0, 0.5))  # a fraction of the signature bits
    min_match: float = option(0.5, Fraction())
    position_scale: float = option(16.0, Number(0, low_open=True))
    check_layer: int = option(1, Layer(room=1))  # later layers must exist to reuse KV in
    save: bool = option(True, Flag())

    def validate(self) -> None:
        if self.store is None:
            self.store = KVStore()
        if not isinstance(self.store, KVStore):
            raise ValueError(f"store must be a tokenreduce.KVStore, got {type(self.store).__name__}")

    def check_llm(self, parts, is_vlm: bool) -> None:
        super().check_llm(parts, is_vlm)
        inv_freq(parts)
        if len(parts.full_attention_layers()) != parts.num_layers:
            raise TypeError("semshare needs every layer to use full attention; this model has sliding-window layers")

    def model_key(self, fingerprint: Callable[[], str]) -> str:
        """Which model's KV an entry holds: ``model_id`` if given (the caller vouches that equal ids compute
        equal KV), else the fingerprint of the weights and config that produce K/V."""
        return f"id:{self.model_id}" if self.model_id is not None else f"fp:{fingerprint()}"

    def fractions(self, num_layers: int) -> list[float]:
        """Fraction of the prompt each layer runs: 1 up to the check layer, then ``c * decay**k`` with mean
        ``retention`` over the later layers."""
        first = min(self.check_layer + 1, num_layers)
        weights = [self.decay ** i for i in range(num_layers - first)]
        c = self.retention * len(weights) / sum(weights) if weights else 1.0
        return [1.0] * first + [min(1.0, c * w) for w in weights]

    # hooks ----------------------------------------------------------------------------------
    def install(self, ctx: KVInstall) -> None:
        self.model_key(lambda: ctx.fingerprint)  # fingerprint now, not in the first request
        for i, layer in enumerate(ctx.parts.layers):
            ctx.add_hook(layer.register_forward_pre_hook(partial(self._before_layer, ctx, i), with_kwargs=True))

    def begin(self, fwd: KVForward) -> None:
        fwd.memo.pop("semshare", None)
        if not fwd.prefill or fwd.cache is None:
            return
        fwd.memo["namespace"] = namespace = current_namespace(self.require_namespace)
        ids = fwd.kwargs.get("input_ids")
        if ids is None:
            raise ValueError("semshare needs input_ids (it hashes the prompt's token embeddings), not inputs_embeds")
        if ids.shape[0] != 1:
            raise ValueError(f"semshare runs one prompt per forward (batch size 1), got batch {ids.shape[0]}; "
                             "send requests one at a time: the store and the patched model are thread-safe")
        if fwd.valid is not None and not bool(fwd.valid.all()):
            raise ValueError("semshare needs an unpadded prompt")
        with torch.no_grad():
            sig = self.store.signatures(mix_positions(fwd.parts.embed(ids)[0], self.position_scale))
        fwd.memo["signatures"] = sig
        length = ids.shape[1]
        match = None
        if self.retention < 1.0 and length > 1:
            bits = int(self.max_distance * self.store.bits)
            match = self.store.best(namespace, self.model_key(fwd.fingerprint), sig, bits)
        fwd.memo["match_rate"] = 0.0
        if match is None:
            return
        ref = match.entry.signatures.to(sig.device)
        index, distance = prefer_in_order(sig, ref, match.index.clamp(min=0), match.distance)
        match.matched = distance <= int(self.max_distance * self.store.bits)
        fwd.memo["match_rate"] = match.rate
        if match.rate < self.min_match:
            return
        pos = torch.arange(length, device=ids.device)
        fwd.memo["semshare"] = Plan(index, (pos - index)[None], match.matched, self.fractions(fwd.parts.num_layers),
                                    match.entry)

    def _before_layer(self, ctx: KVInstall, i: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        fwd = ctx.current()
        plan = fwd.memo.get("semshare") if fwd is not None else None
        if plan is None:
            return None
        layer = fwd.cache.layers[i]
        layer.pending = partial(self._write, fwd, plan, i)
        if i <= self.check_layer:
            return None
        with fwd.timer():
            length = plan.index.shape[0]
            count = max(1, math.ceil(plan.fractions[i] * length - 1e-9))
            rows = plan.deviation.topk(min(count, length)).indices.sort().values
            previous = plan.rows.get(i - 1, torch.arange(length, device=rows.device))
            local = torch.searchsorted(previous, rows)
            plan.rows[i] = rows
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = None
            cos, sin = kwargs["position_embeddings"]
            if cos.shape[-2] == length:
                kwargs["position_embeddings"] = (cos[:, rows], sin[:, rows])
            if kwargs.get("position_ids") is not None and kwargs["position_ids"].shape[-1] == length:
                kwargs["position_ids"] = kwargs["position_ids"][..., rows]
        return (hidden[:, local],), kwargs

    def _reference(self, parts: TextParts, plan: Plan, i: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = plan.entry.keys[i].to(like.device)[None][:, :, plan.index]
        values = plan.entry.values[i].to(like.device)[None][:, :, plan.index]
        return rotate(keys, plan.delta, inv_freq(parts).to(like.device)).to(like.dtype), values.to(like.dtype)

    def _write(self, fwd: KVForward, plan: Plan, i: int, layer, key: torch.Tensor, value: torch.Tensor):
        """Layer ``i``'s prefill: the reference KV for every token, the computed rows written over it."""
        with fwd.timer():
            length = plan.index.shape[0]
            if not layer.is_initialized:
                layer.lazy_initialization(key, value)
            if i < self.check_layer:
                full_k, full_v = key, value
            elif i == self.check_layer:
                ref_k, ref_v = self._reference(fwd.parts, plan, i, key)
                dev = ((key - ref_k).float().norm(dim=-1) / key.float().norm(dim=-1).clamp(min=1e-6)).mean(dim=(0, 1))
                dev = dev + ((value - ref_v).float().norm(dim=-1) / value.float().norm(dim=-1).clamp(min=1e-6)
                             ).mean(dim=(0, 1))
                dev = dev.masked_fill(~plan.matched, float("inf"))
                dev[-1] = float("inf")  # the last token's logits start generation
                plan.deviation = dev
                full_k, full_v = key, value
            else:
                full_k, full_v = self._reference(fwd.parts, plan, i, key)
                rows = plan.rows[i]
                full_k[:, :, rows], full_v[:, :, rows] = key, value
            layer.keys, layer.values = full_k, full_v
            layer.append_positions(torch.arange(length, device=key.device).expand(key.shape[0], 1, -1), length)
        return layer.keys, layer.values

    def attend(self, fwd: KVForward, call: AttentionCall) -> tuple[torch.Tensor, Any]:
        query, key = call.query, call.key
        plan = fwd.memo.get("semshare") if fwd.prefill else None
        if plan is None or call.index <= self.check_layer:
            return call.run(call.mask)
        rows = plan.rows[call.index]
        allowed = torch.arange(key.shape[2], device=key.device)[None, :] <= rows[:, None]
        zero = torch.zeros((), dtype=query.dtype, device=query.device)
        own = torch.where(allowed, zero, torch.finfo(query.dtype).min)[None, None]
        return call.run(own)

    def finish(self, fwd: KVForward, output: Any) -> None:
        if not fwd.prefill or fwd.cache is None or "signatures" not in fwd.memo:
            return
        if self.save and "semshare" not in fwd.memo:
            layers = fwd.cache.layers[: fwd.parts.num_layers]
            self.store.add(fwd.memo["namespace"], self.model_key(fwd.fingerprint), fwd.memo["signatures"],
                           [layer.keys[0] for layer in layers], [layer.values[0] for layer in layers])

    def note(self, fwd: KVForward, record: KVStats) -> None:
        plan = fwd.memo.get("semshare")
        length, n = fwd.length, fwd.parts.num_layers
        rows = [int(plan.rows[i].numel()) if plan is not None and i in plan.rows else length for i in range(n)]
        record.computed_rows = rows
        record.reuse_rate = 1.0 - sum(rows) / (length * n)
        record.notes["match_rate"] = round(fwd.memo.get("match_rate", 0.0), 4)
        record.notes["store_bytes"] = self.store.bytes_used
        record.notes["store_entries"] = len(self.store)
