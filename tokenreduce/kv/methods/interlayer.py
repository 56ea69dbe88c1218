"""Inter-layer KV sharing (PoD, arXiv 2412.02252, "Compressing KV Cache for Long-Context LLM Inference with
Inter-Layer Attention Similarity"), training-free.

Calibration (:meth:`InterLayer.calibrate`) measures, on sample prompts, the attention that the last
``queries`` tokens pay to every key in each layer (a small product, never the ``L x L`` matrix),
per head, and the Jensen-Shannon similarity ``1 - JS / ln 2`` of adjacent layers; adjacent layers
whose mean similarity reaches ``threshold`` form a group (at most ``max_group`` layers). Patched,
after a dense prefill, every layer of a group but the first drops the keys of the distant tokens
(all but the ``sinks`` first tokens and the recent part, ``retention`` of the prompt in all). When
decoding, the group's first layer computes its attention logits for the distant tokens and the
other layers reuse them with their own values, next to their own logits for sinks and recent
tokens (one softmax over both). Saved: the distant keys of every non-first layer of a group.
The paper post-trains the model for this; without training it costs quality, measured in
``benchmarks/kv.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...calibration import CalibrationRun
from ...methods.base import check_fraction, check_layer
from ...methods.options import Fraction, Integer, option
from ...profiles import (
    check_finite_output,
    check_profile_depth,
    check_samples,
    load_profile,
    profile_error,
    profile_source,
)
from ..context import AttentionCall, KVForward, KVInstall
from ..model import text_parts
from ..scores import grouped
from ..stats import KVStats
from .base import CacheMethod


def _observe(run: CalibrationRun, samples: list[dict[str, Any]], queries: int) -> list[list[torch.Tensor]]:
    """Per sample, per layer: attention ``[Hq, n, L]`` of the last ``queries`` rows (float32)."""
    parts = text_parts(run.model)
    found: dict[int, torch.Tensor] = {}

    def observe(module, query, key, value, mask, real, kwargs):
        n = min(queries, query.shape[2])
        hkv, length = key.shape[1], key.shape[2]
        q = grouped(query[:, :, -n:], hkv).float()
        logits = torch.matmul(q, key.float().transpose(-1, -2)) * module.scaling
        qpos = torch.arange(length - n, length, device=key.device).repeat(query.shape[1] // hkv)
        logits = logits.masked_fill(torch.arange(length, device=key.device) > qpos[:, None], float("-inf"))
        found[module.layer_idx] = torch.softmax(logits, -1)[0].reshape(query.shape[1], n, length)
        return real(module, query, key, value, mask, **kwargs)

    out = []
    with run.observe_attention(observe), torch.no_grad():
        for index, sample in enumerate(samples):
            found.clear()
            run.model(**sample, use_cache=False)
            attention = [found[i] for i in range(parts.num_layers)]
            for layer, probs in enumerate(attention):
                check_finite_output(probs, "interlayer", index, f"attention probabilities in layer {layer}")
            out.append(attention)
    return out


def _similarity(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over heads and queries of ``1 - JS(p, q) / ln 2`` (1: the same distribution)."""
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp(min=1e-12).log() - b.clamp(min=1e-12).log())).sum(-1)  # noqa: E731
    js = (kl(p, m) + kl(q, m)) / 2
    return float(1 - (js / math.log(2)).mean())


def check_groups(groups: Any, num_layers: int, where: str) -> None:
    """ValueError unless ``groups`` is a list of groups of adjacent layers, each a non-empty list of increasing
    consecutive layer indices in ``[0, num_layers)``, the groups in order and disjoint (as calibration makes
    them: a layer that shares with no other is a group of one)."""
    if not isinstance(groups, list) or not groups:
        raise profile_error(where, "groups", "must be a non-empty list of lists of adjacent layer indices", groups)
    last = -1
    for group in groups:
        if not isinstance(group, list) or not group or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in group):
            raise profile_error(where, "groups", "must hold non-empty lists of layer indices (integers)", group)
        if group != list(range(group[0], group[0] + len(group))):
            raise profile_error(where, "groups", "must hold adjacent layers in increasing order (a group shares "
                                "keys along consecutive layers)", group)
        if group[0] <= last or group[-1] >= num_layers:
            raise profile_error(where, "groups", f"must be disjoint, in order and within the {num_layers} layers "
                                f"[0, {num_layers - 1}] of num_layers", group)
        last = group[-1]


@dataclass
class InterLayer(CacheMethod):
    name: ClassVar[str] = "interlayer"
    paper: ClassVar[str] = "arXiv 2412.02252 (PoD)"
    description: ClassVar[str] = "calibrated: layers with similar attention share distant tokens' keys (PoD)"

    profile: dict | str | None = None  # checked by validate (schema, groups) and check_llm (depth)
    retention: float = option(0.3, Fraction())
    sinks: int = option(16, Integer(0))

    def validate(self) -> None:
        if self.profile is None:
            raise ValueError("interlayer needs a calibration profile: profile = tokenreduce.calibrate(model, "
                             "'interlayer', samples), then patch(model, 'interlayer', profile=profile)")
        self.profile_source = profile_source(self.profile)
        self.profile = load_profile(self.profile, self.name)
        check_groups(self.profile.get("groups"), self.profile["num_layers"], self.profile_source)

    @classmethod
    def calibrate(cls, model: Any, samples: Any, *, run: CalibrationRun, threshold: float = 0.5, max_group: int = 4,
                  queries: int = 16) -> dict[str, Any]:
        """Group adjacent layers whose attention of the last ``queries`` tokens is similar on ``samples``."""
        check_fraction("threshold", threshold)
        check_layer("max_group", max_group, 1)
        check_layer("queries", queries, 1)
        parts = text_parts(model)
        observed = _observe(run, check_samples(samples, cls.name), queries)
        n = parts.num_layers
        sims = [sum(_similarity(s[i], s[i + 1]) for s in observed) / len(observed) for i in range(n - 1)]
        full = set(parts.full_attention_layers())
        groups = [[0]]
        for i, sim in enumerate(sims):
            last = groups[-1]
            if sim >= threshold and len(last) < max_group and i in full and i + 1 in full:
                last.append(i + 1)
            else:
                groups.append([i + 1])
        return {"method": cls.name, "architecture": run.architecture, "num_layers": n,
                "groups": groups, "similarity": [round(s, 4) for s in sims], "threshold": threshold,
                "max_group": max_group, "samples": len(observed)}

    def check_llm(self, parts, is_vlm: bool) -> None:
        super().check_llm(parts, is_vlm)
        check_profile_depth(self.profile, self.profile_source, self.name, parts.num_layers)
        if getattr(parts.config, "attn_logit_softcapping", None) is not None:
            raise TypeError("interlayer cannot share logits of models with attention logit soft-capping (Gemma 2)")
        if len(parts.full_attention_layers()) != parts.num_layers:
            raise TypeError("interlayer needs every layer to use full attention; this model has sliding layers")

    def install(self, ctx: KVInstall) -> None:
        if self.profile.get("architecture") != ctx.architecture:
            raise ValueError(f"interlayer: {self.profile_source} was calibrated on {self.profile.get('architecture')}, "
                             f"not {ctx.architecture}; calibrate it on this model")
        self.owner = {i: g[0] for g in self.profile["groups"] if len(g) > 1 for i in g}

    def _distant(self, length: int) -> tuple[int, int]:
        proximal = math.ceil(self.retention * length - 1e-9)
        recent = max(0, proximal - self.sinks)
        return min(self.sinks, length), max(min(self.sinks, length), length - recent)

    def compress(self, fwd: KVForward, call: AttentionCall) -> None:
        index, layer, query = call.index, call.layer, call.query
        owner = self.owner.get(index)
        start, end = self._distant(layer.keys.shape[2])
        if owner is None or self.retention >= 1.0 or end <= start:
            return
        valid = fwd.valid[:, start:end] if fwd.valid is not None else None
        layer.state["distant"] = (start, end)
        if owner == index:
            return
        length = layer.keys.shape[2]
        proximal = torch.cat([torch.arange(start, device=query.device), torch.arange(end, length, device=query.device)])
        distant = torch.arange(start, end, device=query.device)
        layer.values = torch.cat([layer.values[:, :, distant], layer.values[:, :, proximal]], dim=2)
        layer.keys = layer.keys[:, :, proximal]
        layer.positions = proximal.expand(layer.keys.shape[0], 1, -1)
        if valid is not None:
            layer.state["distant_valid"] = valid
        layer.compressed = True

    def attend(self, fwd: KVForward, call: AttentionCall) -> tuple[torch.Tensor, Any]:
        index, layer, query, key, value = call.index, call.layer, call.query, call.key, call.value
        scaling = call.module.scaling
        if fwd.prefill or "distant" not in layer.state:
            return super().attend(fwd, call)
        owner = self.owner[index]
        start, end = layer.state["distant"]
        hkv, n = key.shape[1], query.shape[2]
        if owner == index:
            q = grouped(query, hkv)
            fwd.memo[("interlayer", owner)] = torch.matmul(q, key[:, :, start:end].transpose(-1, -2)) * scaling
            return call.run(call.mask)
        with fwd.timer():
            shared = fwd.memo[("interlayer", owner)]  # [B, Hkv, g*n, D]
            if "distant_valid" in layer.state:
                hidden = ~layer.state["distant_valid"][:, None, None, :]
                shared = shared.masked_fill(hidden, torch.finfo(shared.dtype).min)
            own = torch.matmul(grouped(query, hkv), key.transpose(-1, -2)) * scaling
            own = own + layer.mask(n, 1, own.dtype).repeat(1, 1, query.shape[1] // hkv, 1)  # rows in (g, n) order
            probs = torch.softmax(torch.cat([shared, own], dim=-1).float(), dim=-1).to(value.dtype)
            out = torch.matmul(probs, value)  # [B, Hkv, g*n, d]
            b, hq = query.shape[:2]
            out = out.reshape(b, hq, n, -1).transpose(1, 2).contiguous()
        return out, None

    def note(self, fwd: KVForward, record: KVStats) -> None:
        record.notes["groups"] = self.profile["groups"]
