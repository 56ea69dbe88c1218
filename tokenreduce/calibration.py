"""CalibrationRun: what a calibrated method's ``calibrate`` may do with the model, handed to it by
:func:`tokenreduce.calibrate` (which implements it), so that methods never import the API that installs them.

ShortV (:mod:`tokenreduce.methods.shortv`) measures each layer's contribution by running the model patched with
one layer frozen; inter-layer sharing (:mod:`tokenreduce.kv.methods.interlayer`) observes every layer's
attention of the last queries. Both run the samples themselves; this protocol only gives them the model's
depth, a temporary patch and an attention observer, each undone when its block ends.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

# observer(module, query, key, value, mask, real, kwargs): the attention output (usually real's); ``real`` is
# the backend's function (SDPA or eager), ``module.layer_idx`` the layer
AttentionObserver = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                              Callable[..., tuple[torch.Tensor, Any]], dict[str, Any]], tuple[torch.Tensor, Any]]


class CalibrationRun(Protocol):
    """The model being calibrated, as :func:`tokenreduce.calibrate` lends it to a method's ``calibrate``."""

    model: nn.Module

    @property
    def architecture(self) -> str:
        """The model's class name (profiles record it; ``patch`` checks it)."""
        ...

    def num_layers(self) -> int:
        """The LLM's layers as the model family's adapter counts them (TypeError for an unsupported model)."""
        ...

    def patched(self, method: Any) -> AbstractContextManager[Callable[[], Any]]:
        """The model patched with ``method`` (a method object) inside the block, which receives the
        ``stats`` function of that patch; unpatched after it, also on error."""
        ...

    def observe_attention(self, observer: AttentionObserver) -> AbstractContextManager[None]:
        """Every attention call of the LLM's layers goes through ``observer`` inside the block (the model must
        use the SDPA or eager attention implementation)."""
        ...
