"""Model adapters, one per Hugging Face model family, and the lookup from a model to its adapter."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .llava import LlavaNextVideoAdapter, LlavaOnevisionAdapter
from .qwen_vl import Qwen3VLAdapter, QwenVLAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (QwenVLAdapter(), Qwen3VLAdapter(), LlavaOnevisionAdapter(),
                                       LlavaNextVideoAdapter())


def supported_classes(feature: str | None = None) -> list[str]:
    """The supported model classes (with ``feature``: those whose adapter offers it, see ``ModelAdapter``)."""
    return [c for a in ADAPTERS if feature is None or feature in a.features for c in a.classes]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class; TypeError naming the supported classes otherwise."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.classes:
            return adapter
    raise TypeError(f"tokenreduce does not support {name}; supported model classes: "
                    f"{', '.join(supported_classes())}")


__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for", "supported_classes"]
