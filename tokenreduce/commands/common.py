"""What every command shares: usage errors and argument parsers."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import torch


class UsageError(Exception):
    """A bad value on the command line: printed as one line on stderr, exit code 2."""


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype the demo runs in, defaults filled in."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        raise UsageError(f"--device: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available")
    return device, getattr(torch, dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def user_call(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` with its ValueError/TypeError (bad user values) turned into UsageError."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise UsageError(str(err)) from err


def _whole(text: str, zero_allowed: bool) -> int:
    if not text.isdigit() or int(text) < (0 if zero_allowed else 1):
        kind = "non-negative" if zero_allowed else "positive"
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    return _whole(text, zero_allowed=False)


def non_negative_int(text: str) -> int:
    return _whole(text, zero_allowed=True)


def positive_ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers, e.g. ``700,500``."""
    try:
        return tuple(positive_int(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas (e.g. 700,500), got {text!r}") from None


def _finite_float(text: str, zero_allowed: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_allowed):
        kind = "non-negative" if zero_allowed else "positive"
        raise argparse.ArgumentTypeError(f"expected a {kind} finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    return _finite_float(text, zero_allowed=False)


def non_negative_float(text: str) -> float:
    return _finite_float(text, zero_allowed=True)


def retention(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.3 or 'none', got {text!r}") from None


def option(text: str) -> tuple[str, bool | int | float | str | None]:
    """``KEY=VALUE`` with VALUE read as bool, None, int, float or else str."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    if lowered == "none":
        return key, None
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value
