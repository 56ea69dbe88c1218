"""What a reduced LLM layer receives instead of the dense layer's arguments: its current rows' slices of the
position embeddings (1-D RoPE or 3-D M-RoPE: kept tokens keep their original positions, or, after a step that
asked for it, contiguous renumbered ones: ``prefill.renumbered_index``), position ids and attention mask, and
the mask of later tokens over a reduced cache."""

from __future__ import annotations

from typing import Any

import torch

from ..ops import take_rows
from .cache import ReducedDynamicLayer
from .masks import select_mask
from .prefill import ForwardState


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The cache a layer or base-model call was given (None: none)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def cache_layer(cache: Any, idx: int) -> Any:
    """Layer ``idx`` of ``cache``, created (of the cache's own layer class) when it does not exist yet."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"tokenreduce needs a transformers Cache with per-layer storage; got {type(cache).__name__}")
    while len(layers) <= idx:
        if getattr(cache, "layer_class_to_replicate", None) is None:
            raise ValueError("tokenreduce: the cache has no layer for layer "
                             f"{idx} and cannot create one ({type(cache).__name__})")
        layers.append(cache.layer_class_to_replicate())
    return layers[idx]


def uses_mrope(text_config: Any) -> bool:
    """Whether the LLM's rotary embedding is M-RoPE (its rope parameters split the head into ``mrope_section``
    parts for the temporal, height and width positions: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)."""
    for name in ("rope_parameters", "rope_scaling"):
        params = getattr(text_config, name, None)
        if isinstance(params, dict) and "mrope_section" in params:
            return True
    return False


def slice_kwargs(st: ForwardState, kwargs: dict[str, Any], attention: str) -> None:
    """Hand a reduced layer its rows' slices of the position embeddings, position ids and attention mask
    (cached per rows version); ``attention``: the model's own attention implementation. Positions come from
    ``st.position_index`` (each row's own, or the renumbered ones)."""
    index = st.position_index
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        kwargs["position_embeddings"] = st.cached(
            "pe", pe, lambda p: tuple(take_rows(t, index.to(t.device), -2) for t in p))
    pid = kwargs.get("position_ids")
    if pid is not None:
        kwargs["position_ids"] = st.cached("pid", pid, lambda p: take_rows(p, index.to(p.device), -1))
    mask = kwargs.get("attention_mask")
    if mask is None or isinstance(mask, torch.Tensor):
        kwargs["attention_mask"] = st.cached("mask", mask, lambda m: prefill_mask(st, m, attention))
    else:
        raise ValueError(f"tokenreduce cannot reduce with attention masks of type {type(mask).__name__}; "
                         "use attn_implementation='sdpa' or 'eager'")


def prefill_mask(st: ForwardState, mask: torch.Tensor | None, attention: str) -> torch.Tensor | None:
    """The prompt's attention mask over the current rows (None: none needed)."""
    dev = mask.device if mask is not None else st.rows.device
    out = select_mask(mask, st.index.to(dev), st.valid.to(dev), st.rows.to(dev), past=0, padded=st.padded)
    if out is not None and attention.startswith("flash"):
        raise ValueError("tokenreduce: a padded or ragged batch needs attn_implementation='sdpa' or 'eager'")
    return out


def continuation_mask(layer: ReducedDynamicLayer, kwargs: dict[str, Any], hidden: torch.Tensor
                  ) -> torch.Tensor | None:
    """The mask of tokens after the prompt (decoding, a later chunk) over a reduced layer's stored rows."""
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
