"""Frames for a Sample: the project's PyAV decoder for whole videos, a bounded clip reader for
benchmarks that give start/end seconds, folders of frames, and images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..video import read_video
from .datasets import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class MediaError(ValueError):
    """A sample's image or video is missing or cannot be decoded; the message names the file."""


def load_visual(sample: Sample, num_frames: int) -> tuple[str, np.ndarray, float]:
    """``("video", frames [T, H, W, 3], fps of the sampled frames)`` or ``("image", [H, W, 3], 0)``.
    Videos give ``num_frames`` frames sampled evenly (within ``start``/``end`` when set)."""
    try:
        if sample.image is not None:
            return "image", _read_image(sample.image), 0.0
        path = sample.video
        if path is None:
            raise MediaError(f"sample {sample.id} has neither a video nor an image")
        if path.is_dir():
            frames, span = _read_folder(path, num_frames, sample.frames_fps, sample.start, sample.end)
        elif sample.start is not None or sample.end is not None:
            frames, span = _read_clip(path, num_frames, sample.start, sample.end)
        else:
            frames = read_video(path, num_frames)
            span = _duration(path)
        return "video", frames, len(frames) / span if span else 1.0
    except FileNotFoundError as err:
        raise MediaError(f"{sample.benchmark} sample {sample.id}: {err}") from err
    except (ValueError, OSError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{sample.benchmark} sample {sample.id}: {err}") from err


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except UnidentifiedImageError as err:
        raise MediaError(f"cannot decode {path} as an image: {err}") from err


def _duration(path: Path) -> float | None:
    """Seconds of the first video stream, if the container says."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base)
        return container.duration / 1e6 if container.duration else None


def _read_clip(path: Path, num_frames: int, start: float | None, end: float | None) -> tuple[np.ndarray, float]:
    """``num_frames`` frames evenly spaced over ``[start, end]`` seconds (by presentation time)."""
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            decoded = [(float(f.time), f) for f in container.decode(stream) if f.time is not None]
            if not decoded:
                raise MediaError(f"{path} contains no decodable video frames")
            lo = start if start is not None else decoded[0][0]
            hi = end if end is not None else decoded[-1][0]
            inside = [f for t, f in decoded if lo <= t <= hi] or [min(decoded, key=lambda p: abs(p[0] - lo))[1]]
            idx = np.round(np.linspace(0, len(inside) - 1, num_frames)).astype(int)
            return np.stack([inside[i].to_ndarray(format="rgb24") for i in idx]), max(hi - lo, 1e-3)
    except av.error.FFmpegError as err:
        raise MediaError(f"cannot decode {path} as a video: {err}") from err


def _read_folder(path: Path, num_frames: int, fps: float | None, start: float | None, end: float | None
                 ) -> tuple[np.ndarray, float]:
    """Frames stored as image files (sorted by name), at ``fps`` when bounds are given in seconds."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"{path} is a folder without image frames ({', '.join(IMAGE_SUFFIXES)})")
    fps = fps or 1.0
    first = int(round((start or 0) * fps))
    last = len(files) - 1 if end is None else min(len(files) - 1, int(round(end * fps)))
    first = min(first, last)
    idx = np.round(np.linspace(first, last, num_frames)).astype(int)
    frames = [_read_image(files[i]) for i in idx]
    if len({f.shape for f in frames}) > 1:
        raise MediaError(f"{path}: frames differ in size")
    return np.stack(frames), max((last - first + 1) / fps, 1e-3)
