"""The method interfaces. :class:`Method`: a dataclass of options that registers by name (every method,
visual or cache); :class:`VisualMethod`: one that turns a Step into a Selection inside the LLM (and may
hook the vision tower through the :class:`~tokenreduce.context.MethodContext` its ``setup`` receives)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..context import MethodContext
from ..layout import IMAGE
from .options import Fraction, Integer, check_depth, check_options

REGISTRY: dict[str, type[Method]] = {}  # filled as method classes are defined (Method.__init_subclass__)


@dataclass
class Step:
    """What a method sees before LLM layer ``layer``: the current rows of the batch.

    ``rows`` are original sequence indices (-1 = padding row); ``size`` is how many original
    tokens each row stands for; ``kind``/``item``/``frame``/``cell`` describe the current rows
    (the layout gathered at ``rows``); ``importance`` ``[B, L]`` is the attention the last query
    rows paid to each current row in the previous layer (None unless the method asked for it);
    ``visual_in`` ``[B]`` counts each sample's visual tokens before any reduction; ``max_frames``,
    ``max_cells`` and ``max_items`` bound frames per item, cells per frame and items per sample
    (known on the host, so methods need no sync to size things); ``memo`` keeps
    a method's per-forward state between layers.
    """

    layer: int
    num_layers: int
    hidden: torch.Tensor
    rows: torch.Tensor
    size: torch.Tensor
    kind: torch.Tensor
    item: torch.Tensor
    frame: torch.Tensor
    cell: torch.Tensor
    importance: torch.Tensor | None
    visual_in: torch.Tensor
    max_frames: int
    max_cells: int
    max_items: int
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> torch.Tensor:
        return self.rows >= 0

    @property
    def visual(self) -> torch.Tensor:
        return (self.kind >= IMAGE) & self.valid

    def row_index(self) -> torch.Tensor:
        return torch.arange(self.rows.shape[1], device=self.rows.device).expand_as(self.rows)


@dataclass
class Selection:
    """``dest`` ``[B, L]``: each current row's fate. ``dest == row`` keeps it, another row index
    merges it into that row, ``-1`` drops it. ``notes``: the method's report for
    ``Stats.stages[<method name>]`` (None: none).

    ``weight`` ``[B, L]`` (float, positive where it matters): each row's weight in the mean of the
    row it merges into (a kept row counts in its own mean too). None, the default: its size, so a
    merged row is the size-weighted mean of the original tokens it stands for. A method reproducing
    an official code's unweighted mean gives 1 for every row (FrameFusion's ``merge="official"``).
    Sizes add up either way: ``Step.size`` keeps counting the original tokens a row stands for.

    ``renumber``: from the layer this step runs before, the kept rows take contiguous positions, as
    if the removed tokens had never been in the prompt, instead of their original ones (refused on
    M-RoPE models; see ``engine.prefill.renumbered_index``). Once a step has renumbered, every later
    step's rows are renumbered too; a step that removes and merges nothing changes no position."""

    dest: torch.Tensor
    notes: dict[str, Any] | None = None
    weight: torch.Tensor | None = None
    renumber: bool = False

    @classmethod
    def keep(cls, keep: torch.Tensor, renumber: bool = False) -> Selection:
        rows = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        return cls(torch.where(keep, rows, -1), renumber=renumber)


@dataclass
class Method:
    """Base of all methods (visual ones: :class:`VisualMethod`; cache ones: ``kv.methods.base``).
    Subclasses are dataclasses whose fields are the options, each declared with
    :func:`tokenreduce.methods.options.option` and its check (type, range, layer depth), validated when the
    method is built and, for layer options, when it is installed on a model. A subclass with a ``name``
    registers itself in :data:`REGISTRY`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    engine: ClassVar[str] = "hf"  # "hf": engine.hf.HFEngine (visual stages); "kv": kv.engine.KVEngine
    paper: ClassVar[str] = ""  # the paper the method implements (arXiv id or short citation)
    retired: ClassVar[dict[str, str]] = {}  # removed options -> what to do instead (said when one is given)

    def __init_subclass__(cls, register: bool | None = None, **kwargs: Any) -> None:
        """Named subclasses in tokenreduce register by name; others opt in with ``register=True``."""
        super().__init_subclass__(**kwargs)
        if register is None:
            register = cls.__module__.startswith("tokenreduce.")
        if register and cls.__dict__.get("name"):
            REGISTRY[cls.name] = cls

    def __post_init__(self) -> None:
        check_options(self)
        self.validate()

    @classmethod
    def calibrate(cls, model: Any, samples: Any, **options: Any) -> dict[str, Any]:
        """A JSON-serialisable profile for ``patch(model, name, profile=...)``; only calibrated methods
        (ShortV, inter-layer sharing) override this."""
        raise ValueError(f"{cls.name} needs no calibration; calibrated methods: {', '.join(calibrated()) or 'none'}")

    def validate(self) -> None:
        """Raise ValueError on option combinations out of range (each option alone is checked by its
        declaration, before this runs); may fill in defaults derived from other options."""

    def check_model(self, num_layers: int) -> None:
        """Raise ValueError if the options do not fit a model with ``num_layers`` LLM layers (the declared
        layer options are checked here; overrides call this first)."""
        check_depth(self, num_layers)

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class VisualMethod(Method):
    """A method run by :class:`tokenreduce.engine.hf.HFEngine` (vision, embed, layer and freeze stages).

    ``act_layers`` are the LLM layers before which :meth:`reduce` runs; ``score_layers`` the
    layers whose attention must yield importance scores (used before the next layer);
    ``n_queries`` how many last rows the importance is taken from. ``reads_tower``: the method
    observes the vision tower's own computation, so it cannot be composed with a method of the
    ``"vision"`` stage, which rewrites it.
    """

    reads_tower: ClassVar[bool] = False

    @property
    def n_queries(self) -> int:
        return 1

    def act_layers(self, num_layers: int) -> set[int]:
        raise NotImplementedError

    def score_layers(self, num_layers: int) -> set[int]:
        return set()

    def reduce(self, step: Step) -> Selection | None:
        raise NotImplementedError

    def setup(self, ctx: MethodContext) -> Callable[[], None] | None:
        """Called once when the engine installs this method on a model, for methods that need more than
        ``reduce`` (hooks on the vision tower, frozen layers); everything done through ``ctx`` is undone
        by unpatch, and a returned callable is called then too."""
        return None


def calibrated() -> list[str]:
    """Names of the registered methods that have a calibration step."""
    return [n for n, c in REGISTRY.items() if c.calibrate.__func__ is not Method.calibrate.__func__]


def check_fraction(name: str, value: float | None, *, allow_none: bool = False) -> None:
    """A function argument (not a method option) in (0, 1]: the options' :class:`~.options.Fraction` rule."""
    Fraction(none=allow_none)("", name, value)


def check_layer(name: str, value: int, minimum: int = 0) -> None:
    """A function argument (not a method option) that is an integer >= ``minimum``."""
    Integer(minimum)("", name, value)


def check_positions(method: Method, ctx: MethodContext) -> None:
    """ValueError if ``method`` asks for ``positions="renumbered"`` on a model with M-RoPE positions
    (Qwen-VL's ``(t, h, w)``): a visual token's three coordinates come from its place in the image grid,
    so "the kept tokens numbered contiguously" has no single meaning there."""
    if getattr(method, "positions", "original") == "renumbered" and ctx.rope == "mrope":
        raise ValueError(f"{method.name}: positions='renumbered' is not defined on {ctx.architecture}, whose "
                         "M-RoPE gives each visual token 3-D (t, h, w) positions from its place in the image grid; "
                         "use positions='original' (the default: kept tokens keep their original positions), or a "
                         "model with 1-D RoPE (LLaVA-OneVision, LLaVA-NeXT-Video)")


def budget(retention: float, visual_in: torch.Tensor, rounding: str = "ceil") -> torch.Tensor:
    """Visual tokens to keep per sample, ``retention * n`` rounded by ``rounding``: ``"ceil"`` (the
    default: retention 1.0 keeps all, and any retention keeps a token of a non-empty sample), ``"nearest"``
    (Python's ``round``, halves to even: FastV's official ``round(N * (1 - R))``) or ``"floor"``
    (``int(N * ratio)``: PyramidDrop's official count)."""
    n = visual_in.double() * retention
    if rounding == "nearest":
        count = torch.round(n)  # half to even, as Python's round
    elif rounding == "floor":
        count = torch.floor(n)
    elif rounding == "ceil":
        count = torch.ceil(n - 1e-9)
    else:
        raise ValueError(f"budget: unknown rounding {rounding!r}; available: ceil, nearest, floor")
    return count.long().clamp(min=0)


__all__ = ["REGISTRY", "Method", "Selection", "Step", "VisualMethod", "budget", "check_fraction", "check_layer",
           "check_positions"]
