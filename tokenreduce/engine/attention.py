"""An attention function that observes post-RoPE queries and keys, then defers to the real one
(for the active rows' queries only, in a frozen layer: see ``engine.freeze``).

Registered through transformers' ``AttentionInterface`` under ``tokenreduce_<backend>`` (with the
backend's own mask function), so the model keeps SDPA / eager / flash attention unchanged and
importance scores come from the very queries and keys the layer computes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..hooks import ENGINE_ATTR
from ..hooks.attention import backend as _backend
from ..hooks.attention import register_attention

PREFIX = "tokenreduce_"


def wrapped_attention(original: str) -> str:
    """Register (once) and return the name of the observing wrapper around backend ``original``."""
    if original is None or original.startswith(PREFIX):
        raise ValueError(f"cannot wrap attention implementation {original!r}")
    if original != "eager" and original not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"unknown attention implementation {original!r}")
    name = PREFIX + original

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any):
        engine = getattr(module, ENGINE_ATTR, None)
        backend = _backend(module, original)
        if engine is not None:  # observes, and may run only a frozen layer's active rows' queries
            return engine.attend(module, backend, query, key, value, attention_mask, kwargs)
        return backend(module, query, key, value, attention_mask, **kwargs)

    return register_attention(name, original, attention)
