"""``tokenreduce build-kernels``: compile the csrc/ kernels ahead of time and print their status."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "build-kernels", help="compile the C++/CUDA kernels now (otherwise they compile on first use)",
        description="Compile the C++ (and, with --cuda, CUDA) kernels of csrc/ into the kernel cache "
                    "($TOKENREDUCE_KERNELS_CACHE, default ~/.cache/tokenreduce/kernels) and print which kernels "
                    "run. TOKENREDUCE_KERNELS=0|auto|cpu|cuda|all chooses which run (default auto: those "
                    "measured faster than the torch reference).")
    cmd.add_argument("--cuda", action="store_true", help="also build the CUDA kernels (needs nvcc)")
    cmd.add_argument("--archs", default=None, metavar="LIST",
                     help="CUDA compute capabilities, comma-separated (default: the visible GPU's, else 8.0,9.0,10.0)")
    cmd.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    cmd.set_defaults(run=run_build_kernels)


def run_build_kernels(args: argparse.Namespace) -> int:
    """Build, then print one line per kernel and device; exit 1 if a requested build failed."""
    import torch

    from ..kernels import BuildError, build, kernels_status
    from ..kernels.jit import CUDA_ARCHS

    failed = False
    devices = ["cpu"] + (["cuda"] if args.cuda else [])
    for device in devices:
        archs = None
        if device == "cuda":
            archs = tuple(args.archs.split(",")) if args.archs else (None if torch.cuda.is_available() else CUDA_ARCHS)
        try:
            path = build(device, archs=archs, verbose=args.verbose)
            print(f"{device}: built {path}")
        except BuildError as err:
            print(f"{device}: not built: {err}")
            failed = True
    for name, per_device in kernels_status().items():
        for device, text in per_device.items():
            print(f"  {name:20s} {device:4s} {text}")
    return 1 if failed else 0
