"""What ``tokenreduce.patch(model)`` without a method installs, per model kind, and the measurement it rests on.

Video / image LLMs (every class :func:`tokenreduce.supported_classes` lists): the method that kept the most
accuracy at retention 0.3 on the trained organism (a LLaVA-NeXT-Video from DINOv2 ViT-S/14 and SmolLM2-135M
with a trained connector; ``docs/organism.md``). Text-only LLMs: no KV-cache method is picked by default
(their cost in quality depends on the task: ``docs/kv.md``), so :func:`tokenreduce.api.recommend` raises
a ValueError that lists them. This module holds data only: the methods package reads it for ``methods()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Default:
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    why: str = ""


VISUAL = Default("framefusion", {"retention": 0.3},
                 "on the trained organism at retention 0.3 it keeps scene, order, the 1-frame event and count at "
                 "1.00 (0.93 overall, dense 0.98), the most of the methods that cut the LLM's visual tokens (EVS "
                 "0.92, one answer behind: not resolved; docs/organism.md)")
