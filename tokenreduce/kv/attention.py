"""The attention function through which KV methods act: registered with transformers' ``AttentionInterface``.

``tokenreduce_kv_<backend>`` hands every call to the KV engine found on the attention module, which
applies its method (dense attention plus a compression after prefill, a mask over a compressed
cache, a retrieved subset, or a partial attention) and calls the real backend (SDPA or eager) for the
actual product. The backend's own mask function is registered under the same name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..hooks import KV_ATTR
from ..hooks.attention import backend, register_attention

PREFIX = "tokenreduce_kv_"
BACKENDS = ("sdpa", "eager")


def kv_attention(original: str | None) -> str:
    """Register (once) and return the name of the KV wrapper around backend ``original``."""
    if original not in BACKENDS:
        raise ValueError(f"tokenreduce's KV methods need attn_implementation 'sdpa' or 'eager' (they pass their own "
                         f"masks); the model uses {original!r}. Load it with attn_implementation='sdpa'.")
    name = PREFIX + original

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        engine = getattr(module, KV_ATTR, None)
        real = backend(module, original)
        if engine is None:
            return real(module, query, key, value, attention_mask, **kwargs)
        return engine.attend(module, query, key, value, attention_mask, real, kwargs)

    return register_attention(name, original, attention)
