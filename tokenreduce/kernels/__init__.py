"""Compiled kernels for the reduction primitives (``csrc/``), registered as ``torch.ops.tokenreduce.*``.

The functions in :mod:`tokenreduce.ops` call :func:`use` to decide, per call, whether their compiled
op runs: it must be enabled for the tensors' device (see :mod:`.policy`, ``TOKENREDUCE_KERNELS``) and
built; the first such call compiles the kernels into a cache directory (one line on stderr). If the
build fails the torch reference runs and :func:`kernels_status` says why.
"""

from __future__ import annotations

import torch

from .jit import BuildError, build, built, state
from .policy import KERNELS, enabled, mode

__all__ = ["KERNELS", "BuildError", "build", "built", "enabled", "kernels_status", "mode", "use"]

_decided: dict[tuple[str, str], bool] = {}


def use(name: str, *tensors: torch.Tensor) -> bool:
    """Whether kernel ``name`` runs for these tensors: enabled on their device, built (compiling it
    on first use), and no autograd needed (the ops have no backward)."""
    device = tensors[0].device.type
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    key = (name, device)
    decided = _decided.get(key)
    if decided is None:
        decided = _decided[key] = enabled(name, device) and built(device)
    return decided


def reset() -> None:
    """Forget the per-device decisions, so a changed ``TOKENREDUCE_KERNELS`` takes effect (tests)."""
    _decided.clear()


def kernels_status() -> dict[str, dict[str, str]]:
    """Per kernel and device (``cpu``, ``cuda``): whether it runs, and if not, why.

    Nothing is compiled by asking; a kernel that would compile on first use says so."""
    out: dict[str, dict[str, str]] = {}
    for name in KERNELS:
        out[name] = {}
        for device in ("cpu", "cuda"):
            ok, why = enabled(name, device, explain=True)
            built_state = state(device)
            out[name][device] = f"{'enabled' if ok else 'disabled'} ({why}); {built_state}"
    return out
