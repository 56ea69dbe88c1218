"""Which visual methods may be composed on one model, and in which order (checked when they are installed)."""

from __future__ import annotations

from ..methods.base import VisualMethod

EXCLUSIVE_STAGES = {
    "vision": "both rewrite the vision tower's computation",
    "freeze": "both decide which layers leave visual tokens frozen",
}


def check_composition(methods: list[VisualMethod]) -> None:
    """ValueError if two composed methods claim a stage only one can own (see ``EXCLUSIVE_STAGES``), or one
    reads the vision tower (``reads_tower``) that another rewrites. Methods acting before the same LLM layer
    compose: each reduces what the previous one kept."""
    owner: dict[str, str] = {}
    for method in methods:
        for stage in method.stages:
            if stage in EXCLUSIVE_STAGES and stage in owner:
                raise ValueError(f"{owner[stage]} and {method.name} cannot be composed: they "
                                 f"{EXCLUSIVE_STAGES[stage]} (stage {stage!r}); pick one of them")
            owner.setdefault(stage, method.name)
    rewriters = [m.name for m in methods if "vision" in m.stages]
    for method in methods:
        if method.reads_tower and rewriters:
            raise ValueError(f"{method.name} reads the vision tower's attention to choose LLM tokens and cannot be "
                             f"composed with {', '.join(rewriters)}, which rewrite(s) the tower; pick one of them")


def check_order(methods: list[VisualMethod], num_layers: int) -> None:
    """A vision-stage method merging before LLM layer 0 must see the original rows: methods listed before it
    may not act before layer 0 (ValueError otherwise)."""
    for i, method in enumerate(methods):
        if "vision" not in method.stages or 0 not in method.act_layers(num_layers):
            continue
        for other in methods[:i]:
            if 0 in other.act_layers(num_layers):
                raise ValueError(f"{method.name} must come before {other.name} in the method list: it rewrites "
                                 "the vision tower's output, which methods acting before LLM layer 0 read")
