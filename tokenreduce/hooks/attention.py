"""Registering an attention function with transformers' ``AttentionInterface`` (both engines' wrappers)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

Backend = Callable[..., tuple[torch.Tensor, Any]]  # transformers' attention function signature


def backend(module: nn.Module, original: str) -> Backend:
    """The real attention function behind implementation ``original`` for this module ("eager" is the
    modeling file's own ``eager_attention_forward``)."""
    if original == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[original]


def register_attention(name: str, original: str, attention: Backend) -> str:
    """Register (once) ``attention`` under ``name`` with the mask function of backend ``original``, so the
    model builds the masks it builds for ``original``; returns ``name``."""
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name

