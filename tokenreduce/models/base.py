"""ModelAdapter: what the engine needs to know about one Hugging Face model family."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..layout import IMAGE, VIDEO, ItemSpec, TokenLayout, per_sample


class ModelAdapter:
    """Where a family keeps its LLM layers, which ids are visual and how its frames are laid out.

    Subclasses name the transformers classes they support and implement :meth:`item_specs`; a family
    with a vision tower methods may hook builds it in :meth:`tower` and names what it offers in ``features``.
    """

    name: str = ""
    classes: tuple[str, ...] = ()
    deepstack: bool = False  # the LLM adds vision features into early layers' visual rows (Qwen3-VL)
    # "merge_units": a Qwen-VL tower of spatial merge units over 2-frame temporal patches (static);
    # "token_merge": a CLIP/SigLIP/DINOv2 tower whose encoder layers tokens can be merged in (tome-vision)
    features: frozenset[str] = frozenset()

    def tower(self, model: nn.Module) -> Any:
        """The model's vision tower as a :class:`tokenreduce.context.Tower` (see ``models.towers``)."""
        raise ValueError(f"{type(model).__name__} has no vision tower tokenreduce can hook")

    def base_model(self, model: nn.Module) -> nn.Module:
        """The module whose forward receives ``input_ids`` and the pixel inputs."""
        return model.model

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.model.language_model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def token_ids(self, model: nn.Module) -> dict[int, int]:
        cfg = model.config
        return {IMAGE: cfg.image_token_id, VIDEO: cfg.video_token_id}

    def item_specs(self, model: nn.Module, kwargs: dict[str, Any], runs: dict[int, list[list[int]]],
                   repeat: int = 1) -> dict[int, list[list[ItemSpec]]]:
        """Per kind, per sample, the spec of each image or video, in prompt order. ``repeat`` > 1:
        the batch holds each sample ``repeat`` times in a row but the pixel inputs describe each once."""
        raise NotImplementedError

    def build_layout(self, model: nn.Module, kwargs: dict[str, Any], repeat: int = 1) -> TokenLayout | None:
        """The layout of the prompt in ``kwargs`` (the base model's forward arguments), or None
        when the forward carries no ``input_ids`` (decoding from embeddings). ``repeat``: see
        :meth:`item_specs`."""
        input_ids = kwargs.get("input_ids")
        if input_ids is None:
            if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
                raise ValueError("tokenreduce needs input_ids to locate visual tokens; got inputs_embeds "
                                 "with pixel inputs. Pass input_ids instead of inputs_embeds.")
            return None
        ids = input_ids.detach().cpu()
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:
            valid = mask.cpu().bool()
        else:  # no mask, or one generate() prepared already (4-D / per layer type): padding unknown here
            valid = torch.ones_like(ids, dtype=torch.bool)
        layout = TokenLayout.text_only(valid)
        kind, item, frame, cell = layout.kind, layout.item, layout.frame, layout.cell
        token_ids = self.token_ids(model)
        runs = {k: [_runs(ids[b] == tid) for b in range(ids.shape[0])] for k, tid in token_ids.items()}
        specs = self.item_specs(model, kwargs, runs, repeat)
        for b in range(ids.shape[0]):
            items = []  # (first run's start, kind, spec, its runs)
            for k in token_ids:
                first = 0
                for spec in specs[k][b]:
                    item_runs = runs[k][b][first:first + spec.runs]
                    items.append((item_runs[0][0], k, spec, item_runs))
                    first += spec.runs
            for n_item, (_, k, spec, item_runs) in enumerate(sorted(items, key=lambda x: x[0])):
                length = sum(n for _, n in item_runs)
                if spec.num_tokens != length:
                    raise ValueError(
                        f"{self.name}: sample {b} has {length} visual tokens where the pixel inputs imply "
                        f"{spec.num_tokens} ({spec}); input_ids and pixel inputs do not match")
                per_frame, offset = spec.cells, 0
                for start, n in item_runs:
                    idx = torch.arange(offset, offset + n)
                    in_frame = idx < spec.frames * per_frame
                    sl = slice(start, start + n)
                    kind[b, sl] = k
                    item[b, sl] = n_item
                    frame[b, sl] = torch.where(in_frame, idx // per_frame, -1)
                    cell[b, sl] = torch.where(in_frame, idx % per_frame, -1)
                    offset += n
                layout.grids[b].append(spec)
        return layout.to(input_ids.device)


def _runs(mask: torch.Tensor) -> list[list[int]]:
    """[start, length] of each run of True in a 1-D bool tensor."""
    if not bool(mask.any()):
        return []
    m = mask.to(torch.int8)
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), m, torch.zeros(1, dtype=torch.int8)]))
    starts = torch.nonzero(edges == 1).flatten()
    ends = torch.nonzero(edges == -1).flatten()
    return [[int(s), int(e - s)] for s, e in zip(starts, ends, strict=True)]


def split_per_sample(runs: list[list[list[int]]], specs: list[ItemSpec], what: str, repeat: int = 1
                     ) -> list[list[ItemSpec]]:
    """Hand out batch-ordered item specs to the samples, each item taking ``spec.runs`` runs; with
    ``repeat`` > 1 each described sample stands for ``repeat`` consecutive copies in the batch."""
    pos = 0

    def take(b: int) -> list[ItemSpec]:
        nonlocal pos
        taken, mine = 0, []
        while taken < len(runs[b]) and pos < len(specs):
            mine.append(specs[pos])
            taken += specs[pos].runs
            pos += 1
        if taken != len(runs[b]):
            raise ValueError(f"sample {b} has {len(runs[b])} runs of {what} tokens but the pixel inputs "
                             f"describe {taken} for it; input_ids and pixel inputs do not match")
        return mine

    out = per_sample(len(runs), repeat, take)
    if pos != len(specs):
        raise ValueError(f"the pixel inputs describe {len(specs)} {what}s but the prompt places only {pos}")
    return out
