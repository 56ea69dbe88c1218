"""Model adapters, one per Hugging Face model family, and the lookup from a model to its adapter."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .llava import LlavaVideoAdapter
from .qwen_vl import Qwen3VLAdapter, QwenVLAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (QwenVLAdapter(), Qwen3VLAdapter(), LlavaVideoAdapter())


def supported_classes() -> list[str]:
    return [c for a in ADAPTERS for c in a.classes]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class; TypeError naming the supported classes otherwise."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.classes:
            return adapter
    raise TypeError(f"tokenreduce does not support {name}; supported model classes: "
                    f"{', '.join(supported_classes())}")


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "supported_classes"]
