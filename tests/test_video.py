"""Video writing/decoding and the kept-patch picture: round trips and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from tokenreduce.video import read_clip, read_video, video_backend, write_demo_video
from tokenreduce.viz import save_kept_patches


def test_round_trip_and_uniform_sampling(tmp_path):
    path = write_demo_video(tmp_path / "v.mp4", num_frames=12, size=64, motion="static")
    frames = read_video(path)
    assert frames.shape == (12, 64, 64, 3) and frames.dtype == np.uint8
    sampled = read_video(path, 4)
    assert np.array_equal(sampled, frames[[0, 4, 7, 11]])
    assert read_video(path, 2, size=32).shape == (2, 32, 32, 3)


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video(junk)
    with pytest.raises(ValueError, match="pan"):
        write_demo_video(tmp_path / "x.mp4", motion="teleport")
    with pytest.raises(ValueError):
        read_video(junk, 0)


def test_kept_patches_picture_checks_shapes(tmp_path):
    frames = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    kept = np.ones((2, 4, 4))  # one entry per two frames, as Qwen's temporal patches
    assert save_kept_patches(frames, kept, tmp_path / "k.png").stat().st_size > 0
    with pytest.raises(ValueError):
        save_kept_patches(frames, np.ones((3, 4, 4)), tmp_path / "bad.png")


def _has_decord() -> bool:
    import importlib.util

    return importlib.util.find_spec("decord") is not None


@pytest.mark.skipif(not _has_decord(), reason="decord/decord2 not installed")
@pytest.mark.parametrize("motion", ["pan", "cuts"])
def test_decord_and_pyav_give_identical_frames(tmp_path, motion):
    path = write_demo_video(tmp_path / "v.mp4", num_frames=20, size=64, fps=10, motion=motion)  # 0-1.9 s
    for kwargs in ({}, {"num_frames": 6}, {"num_frames": 50}, {"num_frames": 4, "start": 0.55, "end": 1.45},
                   {"num_frames": 3, "start": 1.0}, {"num_frames": 3, "end": 0.3}, {"num_frames": 2, "size": 30}):
        pyav = read_clip(path, backend="pyav", **kwargs)
        decord = read_clip(path, backend="decord", **kwargs)
        assert np.array_equal(pyav.frames, decord.frames), kwargs
        assert pyav.seconds == pytest.approx(decord.seconds), kwargs
    assert read_clip(path, backend="decord").seconds == pytest.approx(2.0)  # 20 frames at 10 fps
    assert video_backend() == "decord"  # preferred when installed
    narrow = write_demo_video(tmp_path / "narrow.mp4", num_frames=4, size=48, motion=motion)
    # decord2 3.4 cannot copy out frames 48 pixels wide; the default reads such a file with PyAV
    assert np.array_equal(read_video(narrow), read_video(narrow, backend="pyav"))


@pytest.mark.parametrize("backend", ["pyav", pytest.param("decord", marks=pytest.mark.skipif(
    not _has_decord(), reason="decord/decord2 not installed"))])
def test_clip_bounds_sample_inside_and_refuse_empty_clips(tmp_path, backend):
    path = write_demo_video(tmp_path / "v.mp4", num_frames=16, size=32, fps=8, motion="static")  # 0-1.875 s
    every = read_video(path, backend=backend)
    assert np.array_equal(read_video(path, 4, start=1.0, end=1.9, backend=backend), every[[8, 10, 13, 15]])
    for start, end, match in ((3.0, 4.0, "holds no frame"), (1.0, 0.5, "before end"), (float("nan"), 1.0, "finite"),
                              (-1.0, None, "finite")):
        with pytest.raises(ValueError, match=match):
            read_video(path, 4, start=start, end=end, backend=backend)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="junk.mp4"):
        read_video(junk, 2, backend=backend)


def test_only_regular_files_are_opened(tmp_path):
    import os
    import threading

    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)
    caught = []
    thread = threading.Thread(target=lambda: caught.append(pytest.raises(ValueError, read_video, fifo, 2)),
                              daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "read_video blocked on a FIFO"
    assert "not a regular file" in str(caught[0].value)
    with pytest.raises(ValueError, match="not a regular file"):
        read_video(tmp_path, 2)


def test_backend_choice(monkeypatch):
    import importlib.util

    with pytest.raises(ValueError, match="opencv"):
        video_backend("opencv")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "decord" else real(name, *a))
    assert video_backend() == "pyav"
    with pytest.raises(ValueError, match="pip install decord2"):
        video_backend("decord")
