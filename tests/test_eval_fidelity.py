"""Merging fidelity driver (tokenreduce.eval.fidelity) on synthetic features with known answers."""

from __future__ import annotations

import pytest
import torch

from tokenreduce.eval.fidelity import drive, measurable_methods, sweep
from tokenreduce.methods import make_method


def _video(frames=4, side=6, dim=16, seed=0, noise=0.0):
    gen = torch.Generator().manual_seed(seed)
    first = torch.randn(1, side, side, dim, generator=gen)
    return first + noise * torch.randn(frames, side, side, dim, generator=gen)


def test_which_methods_are_driven_and_why_others_are_not():
    ok, skipped = measurable_methods()
    assert "framefusion" in ok
    assert "fastv" in skipped and "LLM" in skipped["fastv"]  # chooses by attention inside the LLM
    assert not set(ok) & set(skipped)


def test_identical_frames_merge_without_loss():
    video = _video(frames=4, noise=0.0)
    result = drive(make_method("framefusion", retention=0.25), video)
    assert result.kept_fraction == pytest.approx(0.25)
    assert result.merged_fraction == pytest.approx(0.75) and result.dropped_fraction == 0
    assert result.merge_error < 1e-6 and result.layers == [0]


def test_retention_one_is_lossless():
    result = drive(make_method("framefusion", retention=1.0), _video(noise=0.5))
    assert (result.kept_fraction, result.merge_error, result.nearest_error, result.layers) == (1.0, 0.0, 0.0, [])


def test_error_is_the_size_weighted_mean_replacement():
    """Two frames, every cell of frame 1 folds into frame 0: each token is replaced by the pair's mean."""
    video = _video(frames=2, noise=0.3, seed=1)
    result = drive(make_method("framefusion", retention=0.5, similarity_threshold=-1.0), video)
    assert result.kept_fraction == 0.5 and result.merged_fraction == 0.5
    mean = video.mean(dim=0, keepdim=True)
    expected = ((video - mean).pow(2).sum() / video.pow(2).sum()).sqrt()
    assert result.merge_error == pytest.approx(float(expected), rel=1e-5)


def test_more_motion_loses_more():
    still = drive(make_method("framefusion", retention=0.5, similarity_threshold=-1.0), _video(noise=0.05))
    moving = drive(make_method("framefusion", retention=0.5, similarity_threshold=-1.0), _video(noise=0.5))
    assert 0 < still.merge_error < moving.merge_error


def test_sweep_reports_failures_instead_of_crashing():
    failed: dict[str, str] = {}
    rows = sweep(_video(), [("framefusion", {}), ("framefusion", {"similarity_threshold": 0.9})], [0.5, 1.0],
                 failed=failed)
    assert len(rows) == 4 and failed == {}
    assert {r["retention"] for r in rows} == {0.5, 1.0}
