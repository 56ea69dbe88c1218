"""Frames for a Sample: videos through the project's decoder (:func:`tokenreduce.video.read_clip`: decord when
installed, else PyAV, the same frames either way), folders of frames, and images. Only regular files are
opened: a FIFO or device named by an annotation would block the run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..video import read_clip
from .datasets import Sample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class MediaError(ValueError):
    """A sample's image or video is missing or cannot be decoded; the message names the file."""


def load_visual(sample: Sample, num_frames: int, backend: str | None = None) -> tuple[str, np.ndarray, float]:
    """``("video", frames [T, H, W, 3], fps of the sampled frames)`` or ``("image", [H, W, 3], 0)``.
    Videos give ``num_frames`` frames sampled evenly (within ``start``/``end`` when set; a clip holding no
    frame is a MediaError); ``backend`` is the video decoder (:func:`tokenreduce.video.video_backend`)."""
    try:
        if sample.image is not None:
            return "image", _read_image(sample.image), 0.0
        path = sample.video
        if path is None:
            raise MediaError(f"sample {sample.id} has neither a video nor an image")
        if path.is_dir():
            frames, span = _read_folder(path, num_frames, sample.frames_fps, sample.start, sample.end)
        else:
            clip = read_clip(path, num_frames, start=sample.start, end=sample.end, backend=backend)
            frames, span = clip.frames, clip.seconds
        return "video", frames, len(frames) / span if span else 1.0
    except (ValueError, OSError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{sample.benchmark} sample {sample.id}: {err}") from err


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise MediaError(f"{path} is not a regular file (a folder, FIFO or device); give an image file")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))
    except UnidentifiedImageError as err:
        raise MediaError(f"cannot decode {path} as an image: {err}") from err


def _read_folder(path: Path, num_frames: int, fps: float | None, start: float | None, end: float | None
                 ) -> tuple[np.ndarray, float]:
    """Frames stored as image files (sorted by name), at ``fps`` when bounds are given in seconds."""
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise MediaError(f"{path} is a folder without image frames ({', '.join(IMAGE_SUFFIXES)})")
    fps = fps or 1.0
    first = int(round((start or 0) * fps))
    last = len(files) - 1 if end is None else min(len(files) - 1, int(round(end * fps)))
    if first > last:
        raise MediaError(f"the clip {start or 0:g}-{end if end is not None else '(end)'} s holds no frame of {path} "
                         f"({len(files)} frames at {fps:g} fps: 0-{(len(files) - 1) / fps:g} s)")
    idx = np.round(np.linspace(first, last, num_frames)).astype(int)
    frames = [_read_image(files[i]) for i in idx]
    if len({f.shape for f in frames}) > 1:
        raise MediaError(f"{path}: frames differ in size")
    return np.stack(frames), max((last - first + 1) / fps, 1e-3)
