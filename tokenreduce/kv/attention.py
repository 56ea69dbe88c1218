"""The attention function through which KV methods act: registered with transformers' ``AttentionInterface``.

``tokenreduce_kv_<backend>`` hands every call to the KV engine found on the attention module, which
applies its method (dense attention plus a compression after prefill, a mask over a compressed
cache, a retrieved subset, or a partial attention) and calls the real backend (SDPA or eager) for the
actual product. The backend's own mask function is registered under the same name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "tokenreduce_kv_"
ATTR = "_tokenreduce_kv"  # the KV engine, set on every attention module it serves
BACKENDS = ("sdpa", "eager")

Backend = Callable[..., tuple[torch.Tensor, Any]]


def backend(module: nn.Module, original: str) -> Backend:
    """The real attention function behind ``original`` for this module."""
    if original == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def kv_attention(original: str | None) -> str:
    """Register (once) and return the name of the KV wrapper around backend ``original``."""
    if original not in BACKENDS:
        raise ValueError(f"tokenreduce's KV methods need attn_implementation 'sdpa' or 'eager' (they pass their own "
                         f"masks); the model uses {original!r}. Load it with attn_implementation='sdpa'.")
    name = PREFIX + original

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        engine = getattr(module, ATTR, None)
        real = backend(module, original)
        if engine is None:
            return real(module, query, key, value, attention_mask, **kwargs)
        return engine.attend(module, query, key, value, attention_mask, real, kwargs)

    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name
