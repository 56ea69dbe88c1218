"""Engine-side installation of vision-stage methods: hooks on one model's vision tower, their per-forward
bookkeeping, and the hand-over of what the tower did to the LLM stage and to ``Stats.stages["vision"]``.

Vision encoders run inside the base model's forward (``model(**inputs)``) or, with transformers >= 5.2x,
once inside ``generate`` before any forward (see ``engine.generation``). What an encoder call decided is
kept as *pending* and handed to the next prefill's per-method memo by a pre-hook on the base model that
runs after the engine's own (which builds the layout); a call made inside the forward writes it there
directly.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..threads import PerThread


class VisionHandOff:
    """Per engine and vision-stage method: what the last encoder call decided, until a prefill takes it
    (per thread, as the engine's own call state)."""

    pending = PerThread()  # (generate call it belongs to, memo entries)
    calls = PerThread(lambda: (None, []))  # (prefill or generate call, encoder reports)

    def __init__(self, engine: Any, method: Any) -> None:
        self.engine, self.method = engine, method
        base = engine.adapter.base_model(engine.model)
        engine.installed.add_hook(base.register_forward_pre_hook(self._on_base, with_kwargs=True))

    def publish(self, entries: dict[str, Any], notes: dict[str, Any]) -> None:
        """An encoder call's decisions (for the method's ``reduce``) and its report: ``Stats.stages["vision"]``
        sums ``patches_in``/``patches_encoded`` and lists ``items`` over the encoder calls of one prefill (or
        one ``generate``); other keys come from the last call."""
        engine = self.engine
        owner = engine.state if engine.tracker.in_forward else engine.tracker.current
        if self.calls[0] is not owner or owner is None:
            self.calls = (owner, [])
        self.calls[1].append(notes)
        summed = {k: sum(c[k] for c in self.calls[1]) for k in ("patches_in", "patches_encoded")}
        items = [item for c in self.calls[1] for item in c["items"]]
        engine.stage_notes["vision"] = {"method": self.method.name, **notes, **summed, "items": items}
        if engine.tracker.in_forward and engine.state is not None:
            engine.state.memo.setdefault(self.method.name, {}).update(entries, layout=engine.state.layout, repeat=1)
        elif engine.tracker.current is not None:
            self.pending = (engine.tracker.current, entries)
        # encoder calls outside a forward or generate (user code) hand nothing to the LLM stage

    def _on_base(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        engine, pending = self.engine, self.pending
        if engine.state is None:  # decoding, or no layout
            return
        self.pending = None
        if pending is not None and pending[0] is engine.tracker.current:
            memo = engine.state.memo.setdefault(self.method.name, {})
            memo.update(pending[1], layout=engine.state.layout, repeat=engine.tracker.current["expand"])
        elif self.calls[0] is not engine.tracker.current or engine.tracker.current is None:
            engine.stage_notes.pop("vision", None)  # this prefill's encoder (if any) reports afresh
