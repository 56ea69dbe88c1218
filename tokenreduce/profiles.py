"""Calibration profiles (ShortV's layer contributions, inter-layer groups): JSON files tied to a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def save_profile(profile: dict[str, Any], path: str | Path) -> Path:
    """Write a calibration profile as JSON."""
    path = Path(path)
    path.write_text(json.dumps(profile, indent=2) + "\n")
    return path


def load_profile(profile: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A profile given as a dict or a JSON file path; ValueError naming the file if it is not one."""
    if isinstance(profile, dict):
        return profile
    path = Path(profile)
    if not path.is_file():
        raise ValueError(f"profile {path} does not exist; make one with tokenreduce.calibrate or "
                         "'tokenreduce calibrate'")
    try:
        out = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"profile {path} is not valid JSON: {err}") from err
    if not isinstance(out, dict) or "method" not in out:
        raise ValueError(f"profile {path} is not a tokenreduce profile (no 'method' key)")
    return out
