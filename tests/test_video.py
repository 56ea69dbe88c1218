"""Video writing/decoding and the kept-patch picture: round trips and clear errors on bad input."""

from __future__ import annotations

import numpy as np
import pytest

from tokenreduce.video import read_video, write_demo_video
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
