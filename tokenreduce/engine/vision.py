"""Engine-side installation of vision-stage methods: hooks on one model's vision tower, their per-forward
bookkeeping, and the hand-over of what the tower did to the LLM stage and to ``Stats.stages["vision"]``.

Vision encoders run inside the base model's forward (``model(**inputs)``) or, with transformers >= 5.2x,
once inside ``generate`` before any forward (see ``HFEngine._generate``). What an encoder call decided is
kept as *pending* and handed to the next prefill's per-method memo by a pre-hook on the base model that
runs after the engine's own (which builds the layout); a call made inside the forward writes it there
directly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layout import VIDEO
from ..threads import PerThread


class VisionHandOff:
    """Per engine and vision-stage method: what the last encoder call decided, until a prefill takes it
    (per thread, as the engine's own call state)."""

    pending = PerThread()  # (generate call it belongs to, memo entries)
    calls = PerThread(lambda: (None, []))  # (prefill or generate call, encoder reports)

    def __init__(self, engine: Any, method: Any) -> None:
        self.engine, self.method = engine, method
        base = engine.adapter.base_model(engine.model)
        engine.handles.append(base.register_forward_pre_hook(self._on_base, with_kwargs=True))

    def check_first(self) -> None:
        """A vision-stage method's merge before LLM layer 0 must see the original rows: methods listed
        before it may not act before layer 0."""
        for other in self.engine.methods:
            if other is self.method:
                return
            if 0 in other.act_layers(self.engine.num_layers):
                raise ValueError(f"{self.method.name} must come before {other.name} in the method list: it "
                                 "rewrites the vision tower's output, which methods acting before LLM layer 0 read")

    def publish(self, entries: dict[str, Any], notes: dict[str, Any]) -> None:
        """An encoder call's decisions (for the method's ``reduce``) and its report: ``Stats.stages["vision"]``
        sums ``patches_in``/``patches_encoded`` and lists ``items`` over the encoder calls of one prefill (or
        one ``generate``); other keys come from the last call."""
        engine = self.engine
        owner = engine.state if engine.in_forward else engine.generation
        if self.calls[0] is not owner or owner is None:
            self.calls = (owner, [])
        self.calls[1].append(notes)
        summed = {k: sum(c[k] for c in self.calls[1]) for k in ("patches_in", "patches_encoded")}
        items = [item for c in self.calls[1] for item in c["items"]]
        engine.stage_notes["vision"] = {"method": self.method.name, **notes, **summed, "items": items}
        if engine.in_forward and engine.state is not None:
            engine.state.memo.setdefault(self.method.name, {}).update(entries, layout=engine.state.layout, repeat=1)
        elif engine.generation is not None:
            self.pending = (engine.generation, entries)
        # encoder calls outside a forward or generate (user code) hand nothing to the LLM stage

    def _on_base(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        engine, pending = self.engine, self.pending
        if engine.state is None:  # decoding, or no layout
            return
        self.pending = None
        if pending is not None and pending[0] is engine.generation:
            memo = engine.state.memo.setdefault(self.method.name, {})
            memo.update(pending[1], layout=engine.state.layout, repeat=engine.generation["expand"])
        elif self.calls[0] is not engine.generation or engine.generation is None:
            engine.stage_notes.pop("vision", None)  # this prefill's encoder (if any) reports afresh


def video_items(layout, repeat: int, per_video: list[Any], what: str) -> list[list[tuple[int, Any]]]:
    """Per sample, ``(layout item, entry)`` for each of its videos, handing out the encoder call's
    ``per_video`` entries in batch order (``repeat`` consecutive samples share one described sample)."""
    out, pos = [], 0
    for b, specs in enumerate(layout.grids):
        if b % repeat:
            out.append(out[-1])
            continue
        items = [j for j, spec in enumerate(specs) if spec.kind == VIDEO]
        out.append(list(zip(items, per_video[pos:pos + len(items)], strict=False)))
        pos += len(items)
    if pos != len(per_video):
        raise RuntimeError(f"tokenreduce {what}: the vision tower encoded {len(per_video)} videos but the prompt "
                           f"places {pos}; encode and prefill the same batch")
    return out


def representative_dest(rows: torch.Tensor, layout, repeat: int, reps: list[torch.Tensor], what: str
                        ) -> torch.Tensor:
    """``dest`` ``[B, L]`` merging every video token into the row of the token whose features stand for it
    (``reps``: per video, the representative's index among the video's tokens)."""
    expected = torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
    valid = layout.valid.to(rows.device)
    if not torch.equal(torch.where(valid, expected, -1), rows):
        raise RuntimeError(f"tokenreduce {what}: the rows were reduced before its merge at LLM layer 0")
    dest = expected.clone()
    for b, pairs in enumerate(video_items(layout, repeat, reps, what)):
        for item, rep in pairs:
            pos = torch.nonzero((layout.item[b] == item) & (layout.frame[b] >= 0)).flatten().to(rows.device)
            if pos.numel() != rep.numel():
                raise RuntimeError(f"tokenreduce {what}: a video has {pos.numel()} tokens in the prompt but "
                                   f"{rep.numel()} were encoded")
            dest[b, pos] = pos[rep.to(rows.device)]
    return dest
