"""Which kernels run by default: only those a side-by-side benchmark measured faster than their torch
reference on that device (``benchmarks/bench_kernels.py``; table in ``docs/kernels.md``).

``TOKENREDUCE_KERNELS`` overrides it: ``0`` (or ``off``) runs every reference; ``auto`` (the default)
the measured-faster set; ``cpu`` / ``cuda`` every kernel on that device plus the defaults elsewhere;
``all`` (or ``1``) every kernel everywhere.
"""

from __future__ import annotations

import os

# every compiled op, by its torch.ops.tokenreduce name
KERNELS = ("adjacent_similarity", "fold_runs", "merge_compact", "qk_importance", "gather_rows", "kv_compact",
           "lsh_signatures", "hamming_top1")

# measured faster than the reference at batch 1 and 8 on a quiet CPU (benchmarks/bench_kernels.py; table in
# docs/kernels.md). Not qk_importance (0.29x, 0.47x), lsh_signatures (0.95x, 1.02x) nor fold_runs
# (1.57x but 0.66x: both under 2 ms). CUDA: not measured yet, so nothing by default.
FASTER = {"cpu": frozenset({"adjacent_similarity", "merge_compact", "gather_rows", "kv_compact", "hamming_top1"}),
          "cuda": frozenset()}

MODES = ("0", "off", "auto", "cpu", "cuda", "all", "1")


def mode() -> str:
    """The ``TOKENREDUCE_KERNELS`` mode, validated."""
    value = os.environ.get("TOKENREDUCE_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"TOKENREDUCE_KERNELS={value!r} is not one of {', '.join(MODES)}")
    return {"off": "0", "1": "all"}.get(value, value)


def enabled(name: str, device: str, explain: bool = False) -> bool | tuple[bool, str]:
    """Whether kernel ``name`` is switched on for ``device`` (``cpu``/``cuda``); with ``explain``,
    also why, in words."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; kernels: {', '.join(KERNELS)}")
    m = mode()
    if device not in ("cpu", "cuda"):
        ok, why = False, f"no {device} implementation"
    elif m == "0":
        ok, why = False, "TOKENREDUCE_KERNELS=0"
    elif m in ("all", device):
        ok, why = True, f"TOKENREDUCE_KERNELS={m}"
    elif name in FASTER[device]:
        ok, why = True, f"measured faster than the reference on {device}"
    elif device == "cuda":
        ok, why = False, "not measured on a GPU yet; TOKENREDUCE_KERNELS=cuda enables it"
    else:
        ok, why = False, f"not measured faster than the reference on {device}; TOKENREDUCE_KERNELS={device} enables it"
    return (ok, why) if explain else ok
