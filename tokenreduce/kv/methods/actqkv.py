"""ActQKV (arXiv 2502.13542, "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context LLMs
Inference"): during decoding, attend to the sinks, a recent window and the context blocks retrieved
by an activation-aware probe query, with a per-layer cut-off set by information density.

After a dense prefill each full-attention layer splits the context between the ``sinks`` and the
last ``window`` tokens into blocks of ``block`` tokens, represented by their mean key per KV head.
Every decoding step builds the probe query from the last ``probe`` queries, each weighted by its
activation bias (mean squared deviation from the prompt's per-dimension query statistics), scores
the blocks by cosine to the probe, and keeps the top ``k_l`` blocks per KV head. The cut-off
``k_l`` is proportional to the normalised entropy of the layer's block scores at prefill (flat
scores: information spread, more blocks), scaled so that layers keep ``retention`` of the blocks on
average. The whole KV stays in memory (the paper offloads it); what shrinks is what each decoding
step reads and attends. Deviation: one probe per decoding step over a sliding window of queries
rather than the paper's per-window probes during chunked prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...methods.options import Fraction, Integer, option
from ..context import AttentionCall, KVForward
from ..scores import grouped
from ..stats import KVStats
from .base import CacheMethod


def _bias_weights(queries: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Activation bias of each query ``[B, H, n, d]`` -> normalised weights ``[B, H, n, 1]``."""
    bias = ((queries - mean) / std).pow(2).mean(-1, keepdim=True)
    return bias / bias.sum(dim=2, keepdim=True).clamp(min=1e-6)


@dataclass
class ActQKV(CacheMethod):
    name: ClassVar[str] = "actqkv"
    paper: ClassVar[str] = "arXiv 2502.13542"
    description: ClassVar[str] = "decode-time block retrieval by an activation-aware probe query, per-layer cut-off"

    retention: float = option(0.3, Fraction())
    block: int = option(32, Integer(1))
    sinks: int = option(4, Integer(0))
    window: int = option(64, Integer(1))
    probe: int = option(16, Integer(1))

    def compress(self, fwd: KVForward, call: AttentionCall) -> None:
        layer, query = call.layer, call.query
        length = layer.keys.shape[2]
        end = length - self.window
        nblocks = math.ceil(max(0, end - self.sinks) / self.block)
        if self.retention >= 1.0 or nblocks < 2:
            return
        b, hkv, _, d = layer.keys.shape
        valid = fwd.valid if fwd.valid is not None else torch.ones(b, length, dtype=torch.bool, device=query.device)
        q = grouped(query, hkv).float().reshape(b, hkv, -1, length, d).mean(2)  # group mean [B, Hkv, L, d]
        w = valid[:, None, :, None].float()
        mean = (q * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)
        std = (((q - mean) ** 2 * w).sum(2, keepdim=True) / w.sum(2, keepdim=True).clamp(min=1)).sqrt() + 1e-4
        start = torch.arange(nblocks, device=query.device) * self.block + self.sinks
        token = (start[:, None] + torch.arange(self.block, device=query.device)).clamp(max=end - 1)  # [nb, block]
        inside = (start[:, None] + torch.arange(self.block, device=query.device)) < end
        member = inside[None, :, :] & valid[:, token]  # [B, nb, block]
        keys = layer.keys.float()[:, :, token]  # [B, Hkv, nb, block, d]
        m = member[:, None, :, :, None].float()
        block_keys = (keys * m).sum(3) / m.sum(3).clamp(min=1)
        state = layer.state
        state.update(mean=mean, std=std, block_keys=block_keys, token=token, member=member, end=end,
                     recent=q[:, :, -self.probe:], valid=valid)
        scores = torch.cosine_similarity(self._probe(state)[:, :, None], block_keys, dim=-1)  # [B, Hkv, nb]
        p = torch.softmax(scores * math.sqrt(d), dim=-1)
        entropy = -(p * p.clamp(min=1e-12).log()).sum(-1).mean() / math.log(nblocks)
        state["entropy"] = float(entropy)
        fwd.memo.setdefault("actqkv_layers", []).append(call.index)

    def _probe(self, state) -> torch.Tensor:
        recent = state["recent"]
        return (recent * _bias_weights(recent, state["mean"], state["std"])).sum(2)  # [B, Hkv, d]

    def _cutoffs(self, fwd: KVForward) -> None:
        """Blocks each layer retrieves: proportional to its prefill entropy, ``retention`` on average."""
        cache = fwd.cache
        layers = [cache.layers[i] for i in fwd.full if "entropy" in cache.layers[i].state]
        total = sum(layer.state["entropy"] for layer in layers) or 1.0
        for layer in layers:
            nb = layer.state["block_keys"].shape[2]
            share = layer.state["entropy"] * len(layers) / total
            layer.state["k"] = max(1, min(nb, round(self.retention * nb * share)))

    def attend(self, fwd: KVForward, call: AttentionCall) -> tuple[torch.Tensor, Any]:
        layer, query, key, value = call.layer, call.query, call.key, call.value
        state = layer.state
        if fwd.prefill or "block_keys" not in state:
            return super().attend(fwd, call)
        with fwd.timer():
            if "k" not in state:
                self._cutoffs(fwd)
            b, hkv, _, d = key.shape
            n = query.shape[2]
            q = grouped(query, hkv).float().reshape(b, hkv, -1, n, d).mean(2)
            state["recent"] = torch.cat([state["recent"], q], dim=2)[:, :, -self.probe:]
            scores = torch.cosine_similarity(self._probe(state)[:, :, None], state["block_keys"], dim=-1)
            top = scores.topk(state["k"], dim=-1).indices  # [B, Hkv, k]
            token, member = state["token"], state["member"]
            picked = token[top].flatten(2)  # [B, Hkv, k*block]
            ok = member[torch.arange(b, device=key.device)[:, None, None], top].flatten(2)
            total = key.shape[2]
            sink = torch.arange(min(self.sinks, state["end"]), device=key.device)
            tail = torch.arange(state["end"], total, device=key.device)
            fixed = torch.cat([sink, tail])
            index_all = torch.cat([fixed.expand(b, hkv, -1), picked], dim=2)
            valid = state["valid"]
            length = valid.shape[1]
            fixed_ok = torch.cat([valid[:, sink], valid[:, state["end"]:],
                                  torch.ones(b, total - length, dtype=torch.bool, device=key.device)], dim=1)
            ok_all = torch.cat([fixed_ok[:, None].expand(-1, hkv, -1), ok], dim=2)
            gather = index_all[..., None].expand(-1, -1, -1, d)
            sub_k, sub_v = key.gather(2, gather), value.gather(2, gather.expand(-1, -1, -1, value.shape[-1]))
            pos = torch.where(ok_all, index_all, -1)
            own = layer.mask(n, query.shape[1], query.dtype, positions=pos)
            state["attended"] = int(index_all.shape[2])
        return call.run(own, sub_k, sub_v)

    def note(self, fwd: KVForward, record: KVStats) -> None:
        record.notes["retrieval_layers"] = len(fwd.memo.get("actqkv_layers", []))

    def finish(self, fwd: KVForward, output: Any) -> None:
        if not fwd.prefill and fwd.cache is not None:
            layers = [fwd.cache.layers[i] for i in fwd.full]
            fwd.record.notes["attended_per_layer"] = [layer.state.get("attended", layer.get_seq_length())
                                                         for layer in layers]
