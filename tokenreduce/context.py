"""What a visual method may touch on a patched model: the :class:`MethodContext` its ``setup(ctx)`` receives.

A method never sees the engine that runs it. Everything it installs goes through this narrow, typed
surface (undoable wrappers and hooks, a callback per prefill, the vision-stage hand-over, frozen
layers) and everything it needs to know about the model family comes from :class:`Tower`, which the
model's adapter builds (``tokenreduce.models``). The engine implements the protocols
(``tokenreduce.engine.context``); methods import only this module, so ``methods`` depends on neither
``engine`` nor ``models``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .layout import TokenLayout
from .vision.tome import EncoderBlock

Wrap = Callable[[nn.Module, str, Callable[..., Any]], None]  # wrap(obj, name, wrapper(original, *a, **kw))


@dataclass
class TowerRecord:
    """One encoded image or video on the LLM's token grid: ``scores`` ``[frames, cells]`` (reference
    attention) and ``keys`` ``[frames, cells, head_dim]`` (the layer's keys averaged over heads and over
    the patches of each LLM token), float32. A NaN score marks a token that stands for no patch (a LLaVA
    image's row-end newline token)."""

    scores: torch.Tensor
    keys: torch.Tensor

    @property
    def frames(self) -> int:
        return self.scores.shape[0]

    @property
    def cells(self) -> int:
        return self.scores.shape[1]


class TowerProbe(Protocol):
    """Watches one tower layer's attention without changing the tower (VisionZip's scores and keys)."""

    reference: str  # "cls" or "mean": what the scores are
    layer: int  # the observed tower layer (non-negative)

    def install(self, wrap: Wrap) -> Callable[[], None]:
        """Wrap the encoders through ``wrap`` and hook the tower; returns the undo of the hooks."""

    def take(self) -> dict[int, list[TowerRecord]]:
        """Per kind (IMAGE, VIDEO), the records of this thread's last encoding, handed over once."""


class Tower(Protocol):
    """One model's vision tower, as its family adapter describes it (``tokenreduce.models.towers``)."""

    module: nn.Module  # the tower (Qwen-VL: ``base.visual``; LLaVA: ``base.vision_tower``)
    encoders: nn.Module  # the owner of ``get_image_features`` / ``get_video_features`` (the base model)

    def probe(self, layer: int | None) -> TowerProbe:
        """A probe of tower layer ``layer`` (negative from the end; None: the layer the LLM reads)."""


class MergeUnitTower(Tower, Protocol):
    """A tower of spatial merge units over 2-frame temporal patches (Qwen-VL; feature ``"merge_units"``)."""

    merge_size: int  # patches per side of one merge unit (one LLM token)

    def run_partial(self, forward: Callable[..., torch.Tensor], pixels: torch.Tensor, grid_thw: torch.Tensor,
                    keep: torch.Tensor, rep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The tower's ``forward`` on the ``keep`` units only; unit ``i`` gets the output of unit ``rep[i]``."""


class EncoderLayer(EncoderBlock, Protocol):
    """One encoder layer of an :class:`EncoderTower`, as its family describes it (``models.towers``): what
    ToMe needs (:class:`tokenreduce.vision.tome.EncoderBlock`: residual branches, heads, key projection)
    and what a probe of its attention needs."""

    attention: nn.Module  # the attention module; its first input is the layer's normalised hidden states
    q_proj: nn.Module  # query projection (``k_proj``: key projection), heads x head_dim outputs
    head_dim: int
    scaling: float  # the attention's logit scale


class EncoderTower(Tower, Protocol):
    """A ViT of pre-norm encoder layers (CLIP / SigLIP / DINOv2; feature ``"token_merge"``)."""

    blocks: nn.ModuleList  # the encoder layers
    has_cls: bool  # token 0 is a CLS token

    def block(self, layer: nn.Module) -> EncoderLayer:
        """The description of one of ``blocks``."""

    def patches(self, pixel_values: torch.Tensor) -> int:
        """Patch tokens per image or frame of ``pixel_values`` ``[..., H, W]``."""


class Prefill(Protocol):
    """Read access to one prefill, for :meth:`MethodContext.on_prefill` callbacks."""

    layout: TokenLayout  # the prompt's layout (grids per sample)

    def memo(self, method: str) -> dict[str, Any]:
        """The method's per-prefill memo (``Step.memo`` of its ``reduce`` calls in this prefill)."""


class MethodContext(Protocol):
    """What ``VisualMethod.setup(ctx)`` may do on one model; everything installed is undone by unpatch."""

    architecture: str  # the model's class name (calibration profiles record it)
    num_layers: int  # LLM layers
    features: frozenset[str]  # the model family's capabilities (``ModelAdapter.features``)
    rope: str  # the LLM's positions: "1d" (one RoPE position per token) or "mrope" (Qwen-VL's 3-D M-RoPE)

    def supported(self, feature: str) -> list[str]:
        """The model classes whose family offers ``feature`` (to name them in an error)."""

    def tower(self) -> Any:
        """The family's :class:`Tower` (a :class:`MergeUnitTower` or :class:`EncoderTower` where ``features``
        says so); ValueError if the family has none."""

    def wrap(self, obj: nn.Module, name: str, wrapper: Callable[..., Any]) -> None:
        """Shadow ``obj.<name>`` on this instance by ``wrapper(original, *args, **kwargs)``."""

    def add_hook(self, handle: Any) -> None:
        """A torch hook handle to remove at unpatch."""

    def on_prefill(self, callback: Callable[[Prefill], None]) -> None:
        """Call ``callback`` at the start of every prefill, after its layout is built."""

    def publish_vision(self, entries: dict[str, Any], notes: dict[str, Any]) -> None:
        """A vision-stage encoder call's decisions (``entries``, handed to the method's memo in the
        prefill that uses them, with ``layout`` and ``repeat``) and report (``Stats.stages["vision"]``)."""

    def freeze(self, layers: set[int]) -> None:
        """Leave the visual rows of a prefill frozen in ``layers`` (ShortV's mechanism)."""


__all__ = ["EncoderTower", "MergeUnitTower", "MethodContext", "Prefill", "Tower", "TowerProbe", "TowerRecord", "Wrap"]
