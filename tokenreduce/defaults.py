"""What ``tokenreduce.patch(model)`` without a method installs, per model kind, and the measurement it rests on.

Video / image LLMs (every class :func:`tokenreduce.supported_classes` lists): the method that kept the most
accuracy at retention 0.3 on the trained organism (a LLaVA-NeXT-Video from DINOv2 ViT-S/14 and SmolLM2-135M
with a trained connector; ``docs/organism.md``). Text-only LLMs: no KV-cache method is picked by default
(their cost in quality depends on the task: ``docs`` / README "Long context"), so :func:`recommend` raises
a ValueError that lists them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Default:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    why: str = ""


VISUAL = Default("framefusion", {"retention": 0.3},
                 "the highest accuracy at retention 0.3 among the visual methods on the trained organism, equal to "
                 "dense there (0.66 vs 0.66; the 1-frame event kept at 1.00; docs/organism.md)")


def recommend(model: nn.Module) -> Default:
    """The default method for ``model``'s kind; ValueError listing the choices when there is none."""
    from .methods import REGISTRY
    from .models import adapter_for

    try:
        adapter_for(model)
    except TypeError:
        kv = sorted(n for n, c in REGISTRY.items() if c.engine == "kv")
        visual = sorted(n for n, c in REGISTRY.items() if c.engine != "kv")
        kind = "a text-only LLM" if hasattr(model, "get_input_embeddings") else f"a {type(model).__name__}"
        raise ValueError(
            f"tokenreduce.patch(model) picks a default only for the supported video/image LLM classes; this is "
            f"{kind}, where no KV-cache method is safe for every task. Name one: "
            f"tokenreduce.patch(model, NAME, ...) with NAME among the KV-cache methods {', '.join(kv)} "
            f"(visual methods {', '.join(visual)} need a supported video/image LLM)") from None
    return VISUAL
