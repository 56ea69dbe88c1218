"""How the shared contract (tests/test_semantics.py) runs each registered method: one entry per name in
``tokenreduce.methods.REGISTRY``. The contract is parametrized over REGISTRY, not over this table, so a new
method that is not listed here fails it until its entry says how it reduces, where it is the identity, or
why a test does not apply (a reason is required)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tokenreduce.testing import DINOV2_LLAVA, MODELS

Options = dict[str, Any] | Callable[[Any], dict[str, Any]]  # or built from the tiny model under test
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
LLAVA = ("llava_onevision", "llava_next_video", DINOV2_LLAVA)


@dataclass(frozen=True)
class Contract:
    """``reduce``: options that keep at most ``retention`` of the visual tokens (batch == singles, eager ==
    sdpa, a real reduction of layers and cache); ``identity``: options under which the method changes
    neither logits nor generation; ``families``: the tiny models (``tokenreduce.testing.MODELS``) it
    supports; ``skip``: why ``reduce`` or ``identity`` is None (and where that method's own tests are)."""

    reduce: dict[str, Any] | None
    identity: Options | None
    families: tuple[str, ...] = MODELS
    skip: str = ""

    def __post_init__(self) -> None:
        if (self.reduce is None or self.identity is None) and not self.skip:
            raise ValueError("a Contract without reduce or identity options must say why (skip=...)")


def _zero_shortv_profile(model: Any) -> dict[str, Any]:
    """A ShortV profile whose ``frozen_fraction`` 0 freezes no layer (every contribution 0)."""
    depth = getattr(model.config, "text_config", model.config).num_hidden_layers
    profile = {"method": "shortv", "architecture": type(model).__name__, "num_layers": depth,
               "layer_contribution": [0.0] * depth}
    return {"profile": profile, "frozen_fraction": 0.0}


_CACHE = "a cache (KV) method keeps every visual token; its contract is tests/test_kv.py"
MATRIX: dict[str, Contract] = {
    "aim": Contract({"retention": 0.5}, {"retention": 1.0, "prune": False}),
    "evs": Contract({"retention": 0.5}, {"retention": 1.0}),
    "fastv": Contract({"retention": 0.5}, {"retention": 1.0}),
    "framefusion": Contract({"retention": 0.3}, {"retention": 1.0}),
    "pyramiddrop": Contract({"retention": 0.5}, {"retention": 1.0}),
    "sms": Contract({"retention": 0.5}, {"retention": 1.0, "knee": "slope", "slope": 1e-9, "second_round": False}),
    "visionzip": Contract({"retention": 0.5}, {"retention": 1.0}),
    "shortv": Contract(None, _zero_shortv_profile,
                       skip="freezes layers and removes no token (tests/test_visual_methods.py)"),
    "static": Contract(None, {"retention": 1.0}, families=QWEN,
                       skip="vision-stage method (Qwen towers): it bounds encoded patches, not LLM tokens; its batch "
                            "and reduction tests are tests/test_vision_stage_static.py"),
    "tome-vision": Contract(None, {"r": 0}, families=LLAVA,
                            skip="vision-stage method (CLIP/SigLIP/DINOv2 towers): it merges patches inside the "
                                 "tower; its batch and reduction tests are tests/test_vision_stage_tome.py and "
                                 "tests/test_tower_dinov2.py"),
    "actqkv": Contract(None, None, skip=_CACHE),
    "interlayer": Contract(None, None, skip=_CACHE),
    "semshare": Contract(None, None, skip=_CACHE),
    "semtoken": Contract(None, None, skip=_CACHE),
    "snapkv": Contract(None, None, skip=_CACHE),
    "streamingllm": Contract(None, None, skip=_CACHE),
}


def contract(name: str) -> Contract:
    """The method's entry; fails the calling test when the method is missing from :data:`MATRIX`."""
    if name not in MATRIX:
        pytest.fail(f"method {name!r} is registered but not in tests/method_matrix.py: add its Contract "
                    f"(reduce options, identity options, or why a test does not apply)")
    return MATRIX[name]


def options_for(name: str, test: str, family: str | None = None) -> dict[str, Any] | Options:
    """The ``test`` ("reduce" or "identity") options of ``name``; skips when its entry says the test does not
    apply (with the entry's reason) or ``family`` is one the method does not support."""
    entry = contract(name)
    if family is not None and family not in entry.families:
        pytest.skip(f"{name} supports {', '.join(entry.families)}, not {family}")
    options = getattr(entry, test)
    if options is None:
        pytest.skip(f"{name}: {entry.skip}")
    return options
