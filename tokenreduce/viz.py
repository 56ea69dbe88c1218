"""Matplotlib pictures of what a token reduction method kept.

Matplotlib is imported inside the functions, so importing this module is cheap. Figures are drawn
on an explicit Agg canvas rather than through ``pyplot``, so saving a picture never switches the
caller's interactive backend or leaves figures open.
"""

from __future__ import annotations

import math
import os
import pathlib

import numpy as np

# Removed patches are shown in greyscale at this fraction of their brightness.
_REMOVED_BRIGHTNESS = 0.35
_LUMA = np.array([0.299, 0.587, 0.114])


def save_kept_patches(
    frames: np.ndarray,
    kept: np.ndarray,
    path: str | os.PathLike,
    *,
    title: str = "",
    max_frames: int = 16,
) -> pathlib.Path:
    """Save a PNG grid of frames with removed patches greyed out and kept patches in colour.

    ``frames`` is uint8 ``[T, H, W, 3]``; ``kept`` is ``[Tk, gh, gw]`` of bools or floats in [0, 1]
    (1 kept, 0 removed, fractions e.g. a merged token's weight, blended in between). When one
    temporal token covers several frames (Qwen-VL encodes 2 frames per temporal patch),
    ``Tk = ceil(T / k)`` for a whole ``k`` and each entry is repeated over its ``k`` frames; a
    partial last group (the model padded the frames) is allowed. The patch grid is stretched over
    the frame with nearest-neighbour mapping, so ``H`` need not be a multiple of ``gh``.
    At most ``max_frames`` evenly spaced frames are drawn, each captioned with its kept fraction;
    the title adds the fraction of tokens kept overall. Returns the path written.
    """
    frames, kept = np.asarray(frames), np.asarray(kept, dtype=np.float64)
    if frames.ndim != 4 or frames.shape[-1] != 3 or kept.ndim != 3:
        raise ValueError(
            f"expected frames [T, H, W, 3] and kept [T, gh, gw], got {frames.shape} and {kept.shape}"
        )
    num_frames, height, width, _ = frames.shape
    num_groups, grid_h, grid_w = kept.shape
    group = math.ceil(num_frames / num_groups) if num_groups else 0
    if not num_frames or not group or (num_groups - 1) * group >= num_frames:
        raise ValueError(
            f"kept's {num_groups} temporal entries do not cover frames' {num_frames} frames "
            f"by a whole factor (frames {frames.shape}, kept {kept.shape})"
        )
    if grid_h > height or grid_w > width or not grid_h or not grid_w:
        raise ValueError(f"kept's patch grid {kept.shape[1:]} does not fit frames of {frames.shape[1:3]}")
    if kept.min() < -1e-6 or kept.max() > 1 + 1e-6 or np.isnan(kept).any():
        raise ValueError(f"kept values must lie in [0, 1], got range [{kept.min()}, {kept.max()}]")
    kept = kept.clip(0, 1)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = np.round(np.linspace(0, num_frames - 1, min(num_frames, max_frames))).astype(int)
    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    panel = 2.6
    fig = Figure(figsize=(cols * panel, rows * panel * height / width + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    # Nearest patch for every pixel row/column.
    patch_rows = np.arange(height) * grid_h // height
    patch_cols = np.arange(width) * grid_w // width
    grid_style = {"lw": 0.3, "color": "w", "alpha": 0.3}
    for ax, t in zip(axes, shown, strict=False):
        weight = kept[t // group]
        frame = frames[t].astype(np.float64)
        grey = (frame @ _LUMA)[..., None] * _REMOVED_BRIGHTNESS
        alpha = weight[np.ix_(patch_rows, patch_cols)][..., None]
        ax.imshow((alpha * frame + (1 - alpha) * grey).round().astype(np.uint8))
        ax.hlines(np.arange(1, grid_h) * height / grid_h - 0.5, -0.5, width - 0.5, **grid_style)
        ax.vlines(np.arange(1, grid_w) * width / grid_w - 0.5, -0.5, height - 0.5, **grid_style)
        ax.set_title(f"frame {t}: {weight.mean():.0%} kept", fontsize=9)
        ax.set_axis_off()
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    overall = f"{kept.mean():.1%} of visual tokens kept"
    fig.suptitle(f"{title}\n{overall}" if title else overall)
    return _save(fig, path)


def save_layer_tokens(
    layer_tokens: dict[str, list[int]], path: str | os.PathLike, *, title: str = ""
) -> pathlib.Path:
    """Save a PNG step plot of sequence length per LLM layer, one line per run.

    Shows where in the depth of the model each method shortens the sequence (e.g. pruning at
    layer 2 versus merging before the LLM); the legend gives each run's mean length over layers,
    which tracks the attention/MLP cost. Returns the path written.
    """
    if not layer_tokens or any(len(lengths) == 0 for lengths in layer_tokens.values()):
        raise ValueError("layer_tokens needs at least one run, each with at least one layer")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, lengths in layer_tokens.items():
        label = f"{name} (mean {np.mean(lengths):,.0f})"
        ax.step(range(len(lengths)), lengths, where="mid", marker=".", label=label)
    ax.set_xlabel("LLM layer")
    ax.set_ylabel("sequence length (tokens)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> pathlib.Path:
    """Write ``fig`` as a PNG, creating parent folders."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return path
