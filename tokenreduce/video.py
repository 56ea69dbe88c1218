"""Video I/O with PyAV: synthetic demo clips and frame sampling for video LLMs.

The demo clips are real H.264 files made from photographs shipped inside scikit-image, so examples,
tests and benchmarks exercise the same decode path as user videos without downloading anything.
PyAV, Pillow and scikit-image are imported inside the functions, so importing this module is cheap
and works without the optional ``video`` extras installed.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

import numpy as np

MOTIONS = ("pan", "static", "zoom", "cuts")
# RGB photographs bundled in the scikit-image wheel (no download needed).
IMAGES = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")

# The pan/static window is the photo's shorter side divided by this, leaving room to slide sideways.
_WINDOW_DIVISOR = 1.5
# Pan speed in output pixels per frame at size 224, scaled with the output size.
_PAN_PIXELS_AT_224 = 4.0
_OBJECT_COLOUR = (0, 200, 255)


def write_demo_video(
    path: str | os.PathLike,
    *,
    num_frames: int = 16,
    size: int = 224,
    fps: int = 8,
    motion: str = "pan",
    image: str = "astronaut",
) -> pathlib.Path:
    """Write a square H.264 (yuv420p) mp4 of a scikit-image photograph with a chosen kind of motion.

    Each motion stresses token reduction differently:

    - ``"pan"``: a square window slides sideways across the photo a few pixels per frame
      (bouncing back at the edge), so every frame shifts slightly.
    - ``"static"``: a fixed window with one coloured square moving across it left to right;
      apart from that object, consecutive frames are nearly identical.
    - ``"zoom"``: a centred window shrinking to half its side (a 2x zoom-in).
    - ``"cuts"``: a pan that cuts hard to the next photograph in ``IMAGES`` halfway through.

    ``size`` must be even because yuv420p halves the chroma resolution. Parent folders are created.
    Returns the path written.
    """
    if motion not in MOTIONS:
        raise ValueError(f"unknown motion {motion!r}; allowed: {', '.join(MOTIONS)}")
    if image not in IMAGES:
        raise ValueError(f"unknown image {image!r}; allowed: {', '.join(IMAGES)}")
    if size < 2 or size % 2:
        raise ValueError(f"size must be a positive even number (H.264 yuv420p), got {size}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")

    import av

    if motion == "static":
        render = _static_renderer(image, size, num_frames)
    elif motion == "zoom":
        render = _zoom_renderer(image, size, num_frames)
    elif motion == "pan":
        render = _pan_renderer(image, size)
    else:
        first, second = _pan_renderer(image, size), _pan_renderer(_next_image(image), size)
        cut = (num_frames + 1) // 2

        def render(i: int) -> np.ndarray:
            return first(i) if i < cut else second(i)

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(num_frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(render(i), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return path


def read_video(
    path: str | os.PathLike, num_frames: int | None = None, *, size: int | None = None
) -> np.ndarray:
    """Decode a video into uint8 RGB frames ``[T, H, W, 3]``.

    ``num_frames`` samples that many frames at evenly spaced indices over the whole video
    (``round(linspace(0, total - 1, num_frames))``, as video LLM pipelines do; indices repeat when
    asking for more frames than the video has); ``None`` returns every frame. Frames are decoded
    sequentially and only the sampled ones are converted and kept, so memory grows with
    ``num_frames``, not with the video's length. ``size`` resizes each frame to ``size x size``
    (aspect ratio not kept). Display-rotation metadata is ignored.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 or None, got {size}")

    import av

    resize = {} if size is None else {"width": size, "height": size}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if num_frames is None:
                frames = [f.to_ndarray(format="rgb24", **resize) for f in container.decode(stream)]
                if not frames:
                    raise ValueError(f"{path} contains no decodable video frames")
                return np.stack(frames)
            total = stream.frames or _count_packets(path)
            indices = np.round(np.linspace(0, max(total - 1, 0), num_frames)).astype(int)
            wanted = set(indices.tolist())
            kept: dict[int, np.ndarray] = {}
            frame = None
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    kept[i] = frame.to_ndarray(format="rgb24", **resize)
                    if len(kept) == len(wanted):
                        break
            if frame is None:
                raise ValueError(f"{path} contains no decodable video frames")
            # The container's frame count can overstate what decodes (e.g. a damaged file):
            # indices past the real end take the last decoded frame.
            last = kept[i] if i in kept else frame.to_ndarray(format="rgb24", **resize)
            return np.stack([kept.get(j, last) for j in indices.tolist()])
    except av.error.FFmpegError as err:
        raise ValueError(f"cannot decode {path} as a video: {err}") from err


def _count_packets(path: pathlib.Path) -> int:
    """Count video packets by demuxing only, for containers that do not store a frame count."""
    import av

    with av.open(str(path)) as container:
        return sum(p.size > 0 for p in container.demux(container.streams.video[0]))


def _next_image(name: str) -> str:
    return IMAGES[(IMAGES.index(name) + 1) % len(IMAGES)]


def _crop_resize(photo, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """Resample ``box`` (left, top, right, bottom; sub-pixel allowed) of a PIL image to ``size x size``."""
    from PIL import Image

    return np.asarray(photo.resize((size, size), Image.Resampling.BICUBIC, box=box))


def _pil(name: str):
    """Load a bundled scikit-image photograph as a PIL image."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(getattr(skimage.data, name)())


def _pan_renderer(name: str, size: int) -> Callable[[int], np.ndarray]:
    """Frame ``i`` of a sideways pan: a centred-height square window moving right, bouncing at the edge."""
    photo = _pil(name)
    width, height = photo.size
    side = min(width, height) / _WINDOW_DIVISOR
    travel = width - side
    step = _PAN_PIXELS_AT_224 * size / 224 * side / size  # in source pixels
    top = (height - side) / 2

    def render(i: int) -> np.ndarray:
        offset = (i * step) % (2 * travel)
        left = offset if offset <= travel else 2 * travel - offset
        return _crop_resize(photo, (left, top, left + side, top + side), size)

    return render


def _static_renderer(name: str, size: int, num_frames: int) -> Callable[[int], np.ndarray]:
    """Frame ``i`` of a fixed centred window with a coloured square crossing it left to right."""
    photo = _pil(name)
    width, height = photo.size
    side = min(width, height) / _WINDOW_DIVISOR
    left, top = (width - side) / 2, (height - side) / 2
    background = _crop_resize(photo, (left, top, left + side, top + side), size)
    box = max(size // 8, 1)
    row = (2 * size) // 3 - box // 2

    def render(i: int) -> np.ndarray:
        col = round(i * (size - box) / max(num_frames - 1, 1))
        frame = background.copy()
        frame[row : row + box, col : col + box] = _OBJECT_COLOUR
        return frame

    return render


def _zoom_renderer(name: str, size: int, num_frames: int) -> Callable[[int], np.ndarray]:
    """Frame ``i`` of a centred zoom-in from the full shorter side to half of it."""
    photo = _pil(name)
    width, height = photo.size
    full = min(width, height)

    def render(i: int) -> np.ndarray:
        side = full / (1 + i / max(num_frames - 1, 1))
        left, top = (width - side) / 2, (height - side) / 2
        return _crop_resize(photo, (left, top, left + side, top + side), size)

    return render
