"""Where the parts of a text LLM (or the language model of a VLM) are, found without a model family list."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class TextParts:
    """The decoder layers, their config, the token embedding and the rotary embedding of an LLM."""

    layers: nn.ModuleList
    config: Any
    embed: nn.Module
    rotary: nn.Module | None
    cache_kwarg: str  # "cache" (transformers >= 5.2x) or "past_key_values"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def full_attention_layers(self) -> list[int]:
        """Layers with global attention (sliding-window layers are already bounded and left alone)."""
        types = getattr(self.config, "layer_types", None)
        if not types:
            return list(range(self.num_layers))
        return [i for i, t in enumerate(types[: self.num_layers]) if t == "full_attention"]


def text_parts(model: nn.Module) -> TextParts:
    """The LLM inside ``model``; TypeError naming what is missing for models that are not decoder LLMs."""
    base = getattr(model, "model", model)
    lm = getattr(base, "language_model", base)
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or not hasattr(layers[0], "self_attn"):
        raise TypeError(f"tokenreduce's KV methods need a decoder LLM with model.layers[i].self_attn "
                        f"(Llama, Qwen2, Qwen3, Gemma, Mistral or the language model of a supported VLM); "
                        f"got {type(model).__name__}")
    attn = layers[0].self_attn
    for name in ("layer_idx", "config", "head_dim"):
        if not hasattr(attn, name):
            raise TypeError(f"{type(attn).__name__} has no {name!r}: not a transformers 5.x attention module")
    params = inspect.signature(model.forward).parameters
    kwarg = "cache" if "cache" in params else "past_key_values"
    return TextParts(layers, attn.config, lm.get_input_embeddings(), getattr(lm, "rotary_emb", None), kwarg)


def inv_freq(parts: TextParts) -> torch.Tensor:
    """The rotary frequencies ``[head_dim / 2]`` of a 1-D RoPE model (what re-rotating keys needs)."""
    freq = getattr(parts.rotary, "inv_freq", None)
    if freq is None or getattr(parts.config, "rope_parameters", {}).get("mrope_section"):
        raise TypeError("this method needs a model with 1-D rotary position embeddings (Llama, Qwen2/3, Gemma); "
                        "multimodal M-RoPE language models are not supported by it")
    return freq


def rotate(keys: torch.Tensor, delta: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Keys ``[B, H, L, d]`` rotated by ``delta`` ``[B, L]`` positions (RoPE's rotate-half layout).

    RoPE rotations compose, so a key cached at position p becomes the key of position p + delta
    without recomputing it (attention scaling of extended RoPE variants was applied once already)."""
    angle = delta[:, None, :, None].float() * freq.float()  # [B, 1, L, d/2]
    cos, sin = angle.cos().repeat(1, 1, 1, 2), angle.sin().repeat(1, 1, 1, 2)
    half = keys.shape[-1] // 2
    rotated = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
    return (keys.float() * cos + rotated.float() * sin).to(keys.dtype)
