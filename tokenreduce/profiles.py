"""Calibration profiles (ShortV's layer contributions, inter-layer groups): JSON files tied to a model, and the
checks shared by the calibrated methods: a profile's schema on load, its layer count against the model being
patched, and calibration samples on entry. Every error names the file (or "the profile dict") and the field."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


def save_profile(profile: dict[str, Any], path: str | Path) -> Path:
    """Write a calibration profile as JSON."""
    path = Path(path)
    path.write_text(json.dumps(profile, indent=2) + "\n")
    return path


def profile_source(profile: Any) -> str:
    """How errors name a profile: ``profile /path/x.json`` or ``the profile dict``."""
    return "the profile dict" if isinstance(profile, Mapping) else f"profile {profile}"


def load_profile(profile: str | Path | dict[str, Any], method: str | None = None) -> dict[str, Any]:
    """A profile given as a dict or a JSON file path. ValueError naming the file if it is not a readable
    JSON object with a ``method``; with ``method``, also if it was made for another method or its
    ``architecture`` / ``num_layers`` are malformed (the method checks its own fields, see
    :func:`profile_error`)."""
    where = profile_source(profile)
    if isinstance(profile, Mapping):
        out = dict(profile)
    elif isinstance(profile, (str, os.PathLike)):
        out = _read(Path(profile), where)
    else:
        raise TypeError(f"a profile must be a dict or the path of a JSON file made by tokenreduce.calibrate, got "
                        f"{type(profile).__name__}")
    if not isinstance(out.get("method"), str):
        raise ValueError(f"{where} is not a tokenreduce profile (no 'method' string); make one with "
                         "tokenreduce.calibrate or 'tokenreduce calibrate'")
    if method is None:
        return out
    if out["method"] != method:
        raise ValueError(f"{method}: {where} is for method {out['method']!r}, not {method}")
    if not isinstance(out.get("architecture"), str) or not out["architecture"]:
        raise profile_error(where, "architecture", "must be the model class name it was calibrated on",
                            out.get("architecture"))
    layers = out.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise profile_error(where, "num_layers", "must be a positive integer", layers)
    return out


def _read(path: Path, where: str) -> dict[str, Any]:
    if not path.exists():
        raise ValueError(f"{where} does not exist; make one with tokenreduce.calibrate or 'tokenreduce calibrate'")
    if not path.is_file():
        raise ValueError(f"{where} is not a file (a directory?); give the JSON file made by tokenreduce.calibrate")
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not a text file (not UTF-8 at byte {err.start}); give the JSON file made "
                         "by tokenreduce.calibrate") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(out, dict):
        raise ValueError(f"{where} is not a tokenreduce profile (a JSON {type(out).__name__}, not an object)")
    return out


def profile_error(where: str, field: str, problem: str, value: Any) -> ValueError:
    """The error for a malformed profile field (the value shortened so a long list stays readable)."""
    shown = repr(value)
    if len(shown) > 120:
        shown = shown[:117] + "..."
    return ValueError(f"{where}: '{field}' {problem}, got {shown}; recalibrate (tokenreduce.calibrate)")


def check_profile_depth(profile: dict[str, Any], where: str, method: str, num_layers: int) -> None:
    """ValueError unless ``profile`` was calibrated on a model with ``num_layers`` LLM layers."""
    if profile.get("num_layers") != num_layers:
        raise ValueError(f"{method}: {where} was calibrated on a {profile.get('num_layers')}-layer "
                         f"{profile.get('architecture')}; this model has {num_layers} LLM layers: calibrate it "
                         "on this model")


def finite_numbers(value: Any) -> bool:
    """A list of finite real numbers (no bools, strings, NaN or inf)."""
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)


def check_samples(samples: Iterable[Any], method: str) -> list[dict[str, Any]]:
    """Calibration samples as a list of model keyword-argument dicts, refused (ValueError naming the sample)
    when a sample is not a dict with string keys or holds a floating-point tensor with NaN or inf."""
    if isinstance(samples, (Mapping, str, bytes, torch.Tensor)) or not isinstance(samples, Iterable):
        raise ValueError(f"{method} calibration takes a list of samples (dicts of model keyword arguments such as "
                         f"a processor's output), got {type(samples).__name__}")
    out = list(samples)
    if not out:
        raise ValueError(f"{method} calibration needs at least one sample")
    for i, sample in enumerate(out):
        if not isinstance(sample, Mapping) or not sample:
            raise ValueError(f"{method} calibration sample {i} must be a non-empty dict of model keyword arguments "
                             f"(e.g. a processor's output), got {type(sample).__name__}")
        for key, value in sample.items():
            if not isinstance(key, str):
                raise ValueError(f"{method} calibration sample {i}: keys must be argument names, got {key!r}")
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
                raise ValueError(f"{method} calibration sample {i}: '{key}' holds NaN or inf values")
    return [dict(sample) for sample in out]


def check_finite_output(value: torch.Tensor, method: str, index: int, what: str) -> None:
    """ValueError if the model's ``what`` on calibration sample ``index`` is not finite (a profile averaged
    over it would be NaN)."""
    if not bool(value.isfinite().all()):
        raise ValueError(f"{method} calibration sample {index}: the model's {what} are NaN or inf (overflow in "
                         "float16? try bfloat16 or float32); a profile from it would be NaN")


__all__ = ["check_finite_output", "check_profile_depth", "check_samples", "finite_numbers", "load_profile",
           "profile_error", "profile_source", "save_profile"]
