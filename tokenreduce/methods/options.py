"""Declared method options: each option states its type and range once, on its dataclass field, and one
checker validates every method's options the same way (visual methods and KV methods alike).

    retention: float = option(0.5, Number(0, 1, low_open=True))
    layer: int = option(2, Layer(minimum=1))

:func:`check_options` runs when a method is built (``Method.__post_init__``): finite numbers only (NaN
passes ``x < 0`` checks, so ranges are tested as ``low <= x <= high``), real booleans (``"no"`` is not
False), integers that are not booleans, known choices, layer lists that are non-empty and distinct.
:func:`check_depth` runs when the model is known (``Method.check_model``): layer options must index
existing layers, and leave the layers after them that the method needs (a layer past the model's depth
would silently do nothing). Every error names the method and the option.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

_KEY = "tokenreduce_check"


def option(default: Any, check: Check) -> Any:
    """A dataclass field with default ``default`` validated by ``check``."""
    return field(default=default, metadata={_KEY: check})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Check:
    """One option's rule. ``none``: None is accepted (the option is unset)."""

    none: bool = False

    def describe(self) -> str:
        raise NotImplementedError

    def valid(self, value: Any) -> bool:
        raise NotImplementedError

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        """``value`` (normalised, e.g. a list of layers as a tuple), or ValueError naming ``owner.name``."""
        if value is None and self.none:
            return None
        if not self.valid(value):
            unset = " or None" if self.none else ""
            prefix = f"{owner}: " if owner else ""
            raise ValueError(f"{prefix}{name} must be {self.describe()}{unset}, got {value!r}")
        return value

    def fit(self, owner: str, name: str, value: Any, num_layers: int) -> None:
        """Raise ValueError if ``value`` does not fit a model with ``num_layers`` LLM layers."""


@dataclass(frozen=True)
class Number(Check):
    """A finite real number in ``[low, high]`` (``low_open``/``high_open``: the bound is excluded)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    none: bool = False

    def describe(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a finite number"
        if self.high == math.inf:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        if self.low == -math.inf:
            return f"a finite number {'<' if self.high_open else '<='} {self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"

    def valid(self, value: Any) -> bool:
        if not _is_number(value) or not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


def Fraction(none: bool = False) -> Number:  # noqa: N802  (reads as a type in declarations)
    """A number in (0, 1]: a share of tokens kept."""
    return Number(0, 1, low_open=True, none=none)


@dataclass(frozen=True)
class Integer(Check):
    """An integer (not a bool) ``>= minimum`` (None: any integer, e.g. a Python index that may be negative)."""

    minimum: int | None = 0
    none: bool = False

    def describe(self) -> str:
        return "an integer" if self.minimum is None else f"an integer >= {self.minimum}"

    def valid(self, value: Any) -> bool:
        return _is_int(value) and (self.minimum is None or value >= self.minimum)


@dataclass(frozen=True)
class Flag(Check):
    """True or False, nothing else (``"no"``, ``0`` or ``-1`` are refused, not read as booleans)."""

    none: bool = False

    def describe(self) -> str:
        return "True or False"

    def valid(self, value: Any) -> bool:
        return isinstance(value, bool)


@dataclass(frozen=True)
class Choice(Check):
    """One of ``values``."""

    values: tuple[str, ...] = ()
    none: bool = False

    def describe(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        if value is None and self.none or self.valid(value):
            return value
        raise ValueError(f"{owner}: unknown {name} {value!r}; available: {', '.join(self.values)}")

    def valid(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.values


@dataclass(frozen=True)
class Text(Check):
    """A non-empty string."""

    none: bool = False

    def describe(self) -> str:
        return "a non-empty string"

    def valid(self, value: Any) -> bool:
        return isinstance(value, str) and bool(value)


@dataclass(frozen=True)
class Layer(Integer):
    """An LLM layer index ``>= minimum`` that, on the model, exists and leaves ``room`` layers after it
    (a method acting before layer ``k`` needs ``k <= depth - 1``; one that needs later layers to act on
    what it did needs more)."""

    room: int = 0

    def describe(self) -> str:
        return f"an LLM layer index (integer) >= {self.minimum}"

    def fit(self, owner: str, name: str, value: Any, num_layers: int) -> None:
        last = num_layers - 1 - self.room
        if value is not None and value > last:
            raise ValueError(f"{owner}: {name}={value} but the model has {num_layers} LLM layers; choose "
                             f"{self.minimum} <= {name} <= {last}")


@dataclass(frozen=True)
class Layers(Check):
    """A non-empty sequence of distinct LLM layer indices ``>= minimum`` (stored as a tuple; ``ordered``:
    they must be given in increasing order), each existing on the model."""

    minimum: int = 0
    ordered: bool = False
    none: bool = False

    def describe(self) -> str:
        order = "increasing, " if self.ordered else ""
        return f"a non-empty list of {order}distinct LLM layer indices (integers >= {self.minimum})"

    def valid(self, value: Any) -> bool:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
            return False
        if not all(_is_int(v) and v >= self.minimum for v in value) or len(set(value)) != len(value):
            return False
        return not self.ordered or list(value) == sorted(value)

    def __call__(self, owner: str, name: str, value: Any) -> Any:
        value = super().__call__(owner, name, value)
        return None if value is None else tuple(value)

    def fit(self, owner: str, name: str, value: Any, num_layers: int) -> None:
        bad = [v for v in value or () if v >= num_layers]
        if bad:
            raise ValueError(f"{owner}: {name} {bad} do not exist; the model has {num_layers} LLM layers "
                             f"(choose indices in [{self.minimum}, {num_layers - 1}])")


def checks(obj: Any) -> list[tuple[str, Check]]:
    """The declared (option name, check) pairs of a method object or class."""
    return [(f.name, f.metadata[_KEY]) for f in fields(obj) if _KEY in f.metadata]


def check_options(method: Any) -> None:
    """Validate (and normalise) every declared option of ``method`` in place."""
    owner = getattr(method, "name", "") or type(method).__name__
    for name, check in checks(method):
        setattr(method, name, check(owner, name, getattr(method, name)))


def check_depth(method: Any, num_layers: int) -> None:
    """Raise ValueError if a declared layer option of ``method`` does not fit ``num_layers`` LLM layers."""
    owner = getattr(method, "name", "") or type(method).__name__
    for name, check in checks(method):
        check.fit(owner, name, getattr(method, name), num_layers)


__all__ = ["Check", "Choice", "Flag", "Fraction", "Integer", "Layer", "Layers", "Number", "Text", "check_depth",
           "check_options", "checks", "option"]
