"""Video I/O: synthetic demo clips (PyAV) and frame sampling for video LLMs (decord when installed, else PyAV).

The demo clips are real H.264 files made from photographs shipped inside scikit-image, so examples,
tests and benchmarks exercise the same decode path as user videos without downloading anything.
decord, PyAV, Pillow and scikit-image are imported inside the functions, so importing this module is cheap
and works without the optional ``video`` extras installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pathlib
from collections.abc import Callable

import numpy as np

MOTIONS = ("pan", "static", "zoom", "cuts")
BACKENDS = ("decord", "pyav")  # video decoders, see video_backend()
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


def video_backend(backend: str | None = None) -> str:
    """The decoder :func:`read_video` uses: ``backend`` if given (``"decord"`` or ``"pyav"``), else decord
    when it is importable (the ``decord`` package or its maintained fork ``decord2``, which LLaVA-Video and
    lmms-eval use: fast random frame access in long videos), else PyAV. Both give identical frames (tested)."""
    if backend is None:
        return "decord" if importlib.util.find_spec("decord") is not None else "pyav"
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    if backend == "decord" and importlib.util.find_spec("decord") is None:
        raise ValueError("video backend 'decord' is not installed (pip install decord2), use 'pyav'")
    return backend


class _DecoderError(ValueError):
    """The decoder could not open or decode the file (as opposed to a clip that holds no frame)."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """Frames sampled from a video and the seconds they span (the clip's bounds, else the whole video)."""

    frames: np.ndarray
    seconds: float


def read_video(
    path: str | os.PathLike,
    num_frames: int | None = None,
    *,
    size: int | None = None,
    start: float | None = None,
    end: float | None = None,
    backend: str | None = None,
) -> np.ndarray:
    """Decode a video into uint8 RGB frames ``[T, H, W, 3]``; see :func:`read_clip` for the arguments."""
    return read_clip(path, num_frames, size=size, start=start, end=end, backend=backend).frames


def read_clip(
    path: str | os.PathLike,
    num_frames: int | None = None,
    *,
    size: int | None = None,
    start: float | None = None,
    end: float | None = None,
    backend: str | None = None,
) -> Clip:
    """Sample uint8 RGB frames ``[T, H, W, 3]`` from a video file, with decord or PyAV (:func:`video_backend`).

    ``num_frames`` samples that many frames at evenly spaced indices
    (``round(linspace(0, total - 1, num_frames))``, as video LLM pipelines do; indices repeat when asking for
    more frames than there are); ``None`` returns every frame. ``start``/``end`` (seconds) restrict the
    sampling to the frames whose presentation time lies in ``[start, end]``; a clip holding no frame is a
    ValueError naming the bounds and the video's time range. Only the sampled frames are converted and kept,
    so memory grows with ``num_frames``, not with the video's length. ``size`` resizes each frame to
    ``size x size`` (bilinear, aspect ratio not kept, the same for both backends). Display-rotation metadata
    is ignored. Only regular files are opened (a FIFO or device would block). ``Clip.seconds`` is
    ``end - start`` for a clip, else the video's duration from its frames' presentation times.

    With ``backend=None``, a file decord fails on is read with PyAV (decord2 3.4 refuses frames 16 or 48
    pixels wide that PyAV decodes); a file neither can decode is a ValueError naming it.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file (a folder, FIFO or device); give a video file")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 or None, got {size}")
    for name, bound in (("start", start), ("end", end)):
        if bound is not None and not (math.isfinite(bound) and bound >= 0):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {bound}")
    if start is not None and end is not None and start >= end:
        raise ValueError(f"start ({start} s) must be before end ({end} s)")

    if video_backend(backend) == "pyav":
        return _sample(_PyAVVideo(path), num_frames, size, start, end)
    try:
        return _sample(_DecordVideo(path), num_frames, size, start, end)
    except _DecoderError:
        if backend is not None:
            raise
        return _sample(_PyAVVideo(path), num_frames, size, start, end)


def _sample(video: _PyAVVideo | _DecordVideo, num_frames: int | None, size: int | None, start: float | None,
            end: float | None) -> Clip:
    """The sampling rule of :func:`read_clip`, the same for every decoder."""
    path = video.path
    times = video.times()
    if not len(times):
        raise _DecoderError(f"{path} contains no decodable video frames")
    if start is None and end is None:
        candidates = np.arange(len(times))
        step = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else video.frame_seconds()
        seconds = float(times[-1] - times[0] + step)
    else:
        lo = times[0] if start is None else start
        hi = times[-1] if end is None else end
        candidates = np.flatnonzero((times >= lo) & (times <= hi))
        if not len(candidates):
            raise ValueError(f"the clip {lo:g}-{hi:g} s holds no frame of {path} (its frames lie at "
                             f"{times[0]:g}-{times[-1]:g} s)")
        seconds = float(max(hi - lo, 1e-3))
    if num_frames is not None:
        candidates = candidates[np.round(np.linspace(0, len(candidates) - 1, num_frames)).astype(int)]
    frames = video.frames(candidates.tolist())
    return Clip(frames if size is None else _resize(frames, size), seconds)



class _PyAVVideo:
    """PyAV: presentation times from demuxing alone; frames decoded sequentially, only the wanted converted."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path

    def _open(self):
        import av

        try:
            container = av.open(str(self.path))
        except av.error.FFmpegError as err:
            raise _DecoderError(f"cannot decode {self.path} as a video: {err}") from err
        if not container.streams.video:
            container.close()
            raise _DecoderError(f"{self.path} has no video stream")
        return container

    def times(self) -> np.ndarray:
        import av

        with self._open() as container:
            stream = container.streams.video[0]
            try:
                packets = [p.pts for p in container.demux(stream) if p.size > 0]
            except av.error.FFmpegError as err:
                raise _DecoderError(f"cannot decode {self.path} as a video: {err}") from err
            if packets and all(pts is not None for pts in packets):
                return np.sort(np.array(packets, dtype=np.float64) * float(stream.time_base))
            return np.arange(len(packets)) * self.frame_seconds()  # no timestamps: the stream's frame rate

    def frame_seconds(self) -> float:
        with self._open() as container:
            rate = container.streams.video[0].average_rate
            return 1.0 / float(rate) if rate else 1.0

    def frames(self, indices: list[int]) -> np.ndarray:
        import av

        wanted = set(indices)
        kept: dict[int, np.ndarray] = {}
        frame = None
        i = -1
        try:
            with self._open() as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        kept[i] = frame.to_ndarray(format="rgb24")
                        if len(kept) == len(wanted):
                            break
        except av.error.FFmpegError as err:
            raise _DecoderError(f"cannot decode {self.path} as a video: {err}") from err
        if frame is None:
            raise _DecoderError(f"{self.path} contains no decodable video frames")
        # The demuxed packets can overstate what decodes (e.g. a damaged file): indices past the real end
        # take the last decoded frame.
        last = kept[i] if i in kept else frame.to_ndarray(format="rgb24")
        return np.stack([kept.get(j, last) for j in indices])


class _DecordVideo:
    """decord / decord2: a frame index built on opening, random access to the wanted frames."""

    def __init__(self, path: pathlib.Path) -> None:
        import decord

        self.path = path
        try:
            self.reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
        except (RuntimeError, decord.DECORDError) as err:
            raise _DecoderError(f"cannot decode {path} as a video: {err}") from err

    def times(self) -> np.ndarray:
        if not len(self.reader):
            return np.zeros(0)
        return np.asarray(self.reader.get_frame_timestamp(np.arange(len(self.reader))), np.float64)[:, 0]

    def frame_seconds(self) -> float:
        rate = self.reader.get_avg_fps()
        return 1.0 / rate if rate else 1.0

    def frames(self, indices: list[int]) -> np.ndarray:
        import decord

        unique = sorted(set(indices))
        try:
            batch = self.reader.get_batch(unique).asnumpy()
        except (RuntimeError, decord.DECORDError) as err:
            raise _DecoderError(f"cannot decode {self.path} as a video: {err}") from err
        row = {j: n for n, j in enumerate(unique)}
        return batch[[row[j] for j in indices]]


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """Every frame resized to ``size x size`` with Pillow's bilinear filter (one rule for both backends)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size), Image.Resampling.BILINEAR))
                     for f in frames])


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
