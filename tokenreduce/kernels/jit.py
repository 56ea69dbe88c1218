"""Compiling and loading ``csrc/`` with ``torch.utils.cpp_extension`` (JIT, cached).

Two shared libraries: ``tokenreduce_cpu`` (the operator schemas and the C++ kernels; needs a C++
compiler and ninja) and ``tokenreduce_cuda`` (the CUDA kernels; needs nvcc, and is only built where a
GPU is visible or when asked for). Both go to a cache directory keyed by the torch version and a hash
of the sources, so a second process, or a second run, only loads them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import traceback
from pathlib import Path

import torch

SOURCES = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("cpu_kernels.cpp",)  # includes torch_bindings.cpp and cpu/*.cpp: one unit, headers parsed once
CUDA_SOURCES = ("cuda/bindings.cpp", "cuda/similarity.cu", "cuda/merge.cu", "cuda/importance.cu", "cuda/gather.cu",
                "cuda/lsh.cu")
# GPU generations built by `tokenreduce build-kernels --cuda` (JIT on a GPU builds for that GPU only)
CUDA_ARCHS = ("8.0", "9.0", "10.0")


class BuildError(RuntimeError):
    """The kernels could not be compiled or loaded; the message says why."""


_loaded: dict[str, str] = {}  # device -> library path
_failed: dict[str, str] = {}  # device -> reason


def cache_dir(device: str = "cpu") -> Path:
    """``$TOKENREDUCE_KERNELS_CACHE`` (else ``~/.cache/tokenreduce/kernels``) / torch version and a hash of
    ``device``'s sources (the CPU library does not read csrc/cuda, the CUDA one not csrc/cpu*) / ``device``."""
    root = os.environ.get("TOKENREDUCE_KERNELS_CACHE") or Path.home() / ".cache" / "tokenreduce" / "kernels"
    digest = hashlib.sha256()
    for path in sorted(SOURCES.rglob("*")):
        name = path.relative_to(SOURCES).as_posix()
        if path.suffix in (".h", ".cpp", ".cu", ".cuh") and not name.startswith("cuda/" if device == "cpu" else "cpu"):
            digest.update(name.encode() + path.read_bytes())
    return Path(root) / f"torch{torch.__version__}-{digest.hexdigest()[:12]}" / device


def _library(device: str) -> Path:
    return cache_dir(device) / f"tokenreduce_{device}.so"


def _missing_sources(names: tuple[str, ...]) -> list[str]:
    return [n for n in names if not (SOURCES / n).is_file()]


def _cpp_extension():
    """torch.utils.cpp_extension, without its import-time warning about a missing CUDA runtime."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _why_not(device: str) -> str | None:
    """Why ``device``'s kernels cannot be built here, or None."""
    cpp_extension = _cpp_extension()

    names = CPU_SOURCES if device == "cpu" else CUDA_SOURCES
    if missing := _missing_sources(names):
        return f"kernel sources not found in {SOURCES} ({', '.join(missing)}); install from a source checkout"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if device == "cuda" and cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


def _cudart_dirs(cuda_home: str) -> list[str]:
    """-L for libcudart when the toolkit keeps it outside ``lib64``/``lib`` (where cpp_extension looks),
    as versioned toolkits under ``CUDA_HOME/cuda-X.Y/lib`` do."""
    home = Path(cuda_home)
    if any((home / d / "libcudart.so").exists() for d in ("lib64", "lib")):
        return []
    found = sorted(home.glob("cuda*/lib*/libcudart.so"))
    return [f"-L{found[-1].parent}"] if found else []


def _compile(device: str, archs: tuple[str, ...] | None, verbose: bool) -> Path:
    cpp_extension = _cpp_extension()

    directory = cache_dir(device)
    directory.mkdir(parents=True, exist_ok=True)
    target = _library(device)
    if not target.exists() or verbose:
        print(f"tokenreduce: compiling the {device.upper()} kernels into {directory} (once; about a minute)",
              file=sys.stderr, flush=True)
    names = CPU_SOURCES if device == "cpu" else CUDA_SOURCES
    kwargs = {}
    if device == "cuda":
        if archs is None:
            major, minor = torch.cuda.get_device_capability()
            archs = (f"{major}.{minor}",)
        gencode = []
        for arch in archs:
            code = arch.replace(".", "")
            gencode += ["-gencode", f"arch=compute_{code},code=sm_{code}"]
        last = archs[-1].replace(".", "")
        gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
        kwargs["extra_cuda_cflags"] = ["-O3", *gencode]
        kwargs["extra_ldflags"] = _cudart_dirs(cpp_extension.CUDA_HOME)
    cpp_extension.load(name=f"tokenreduce_{device}", sources=[str(SOURCES / n) for n in names],
                       build_directory=str(directory), extra_cflags=["-O3"], is_python_module=False,
                       verbose=verbose, **kwargs)
    return target


def _first_error(err: Exception) -> str:
    """The compiler's first error line (the rest of the log follows from it), else the last line."""
    text = str(err) + "\n" + str(err.__cause__ or "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() and "subcommand failed" not in line]
    return (errors or lines or [type(err).__name__])[0][:300]


def build(device: str = "cpu", archs: tuple[str, ...] | None = None, verbose: bool = False) -> Path:
    """Compile (if not cached) and load ``device``'s kernels; the library path. BuildError says why not.

    The CUDA library registers its implementations of the schemas the CPU library defines, so the CPU
    library is always built first."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device in _loaded:
        return Path(_loaded[device])
    if device == "cuda":
        build("cpu", verbose=verbose)
    if why := _why_not(device):
        _failed[device] = why
        raise BuildError(why)
    try:
        path = _compile(device, archs, verbose)
    except Exception as err:  # compiler or loader errors: keep the reason, run the reference
        _failed[device] = f"build failed: {_first_error(err)}"
        if verbose:
            traceback.print_exc()
        raise BuildError(_failed[device]) from err
    _loaded[device] = str(path)
    _failed.pop(device, None)
    return path


def built(device: str) -> bool:
    """Whether ``device``'s kernels are loaded, building them now if they can be; never raises."""
    if device in _loaded:
        return True
    if device in _failed:
        return False
    if device == "cuda" and not torch.cuda.is_available():
        _failed[device] = "CUDA is not available"
        return False
    try:
        build(device)
    except BuildError:
        return False
    return True


def state(device: str) -> str:
    """The build state of ``device``'s kernels in words; compiles nothing."""
    if device in _loaded:
        return f"loaded from {_loaded[device]}"
    if device in _failed:
        return f"not built: {_failed[device]}"
    if device == "cuda" and not torch.cuda.is_available():
        return "not built: CUDA is not available"
    if why := _why_not(device):
        return f"not built: {why}"
    if _library(device).exists():
        return f"compiled at {_library(device)} (loads on first use)"
    return "not compiled yet (compiles on first use, or run `tokenreduce build-kernels`)"
