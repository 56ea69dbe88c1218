"""Qwen2-VL and Qwen2.5-VL (3-D M-RoPE): every multimodal embedding leaves ``embed_multimodal`` with its
original (t, h, w) position in ``POSITION_CHANNELS`` extra channels, rewritten into the prompt's M-RoPE
positions by vLLM's own ``recompute_mrope_positions`` rules for the dense prompt."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

from tokenreduce.methods.pre_llm import reduce_video

from .positions import encode_positions, media_positions
from .processing import (
    RequestSettings,
    encoder_chunks,
    engine_settings,
    prompt_ids,
    split_positions,
    video_settings,
)
from .settings import split_request


class _QwenProcessorMixin(RequestSettings):
    """Video placeholders: ``video_token_count`` of the (t, h/merge, w/merge) grid."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, split_request(hf_processor_mm_kwargs)[1], out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        if self._engine_settings() is None:
            return updates
        merge = hf_config.vision_config.spatial_merge_size
        video_token = hf_config.video_token_id

        def video_replacement(item_idx: int) -> list[int]:
            t, h, w = map(int, out_mm_kwargs["video"][item_idx]["video_grid_thw"].data.tolist())
            return [video_token] * self._video_token_count(out_mm_kwargs, item_idx, t, (h // merge) * (w // merge))

        return [PromptReplacement(modality="video", target=u.target, replacement=video_replacement)
                if u.modality == "video" else u for u in updates]


class _QwenReduce:
    """Reduction in ``embed_multimodal`` and the position hook for the runner."""

    def _tokenreduce_init(self, vllm_config) -> None:
        self.tokenreduce = engine_settings(vllm_config)
        self.tokenreduce_positions = self.tokenreduce is not None  # read by runner_hook
        if self.tokenreduce is not None:
            self.supports_multimodal_pruning = True
        self.tokenreduce_last: list[torch.Tensor] = []  # kept flat indices of each video of the last call

    def embed_multimodal(self, **kwargs: object):
        if self.tokenreduce is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        out: list[torch.Tensor] = []
        last: list[torch.Tensor] = []
        for key, inp in inputs.items():
            if inp is None:
                continue
            if key.startswith("image"):
                for emb, grid in zip(self._process_image_input(inp), inp["image_grid_thw"].tolist(), strict=True):
                    pos = media_positions(grid, merge, 1.0)
                    out.append(torch.cat([emb, encode_positions(pos, emb)], dim=1))
                continue
            seconds = inp.get("second_per_grid_ts")
            seconds = seconds.tolist() if seconds is not None else None
            grids = inp["video_grid_thw"].tolist()
            settings = video_settings(kwargs, len(grids), self.tokenreduce)
            for i, (emb, grid) in enumerate(zip(self._encode_videos(inp), grids, strict=True)):
                t, h, w = map(int, grid)
                cells = (h // merge) * (w // merge)
                index, kept = reduce_video(settings[i].method, emb.view(t, cells, -1), settings[i].retention)
                factor = (seconds[i] if seconds is not None else 1.0) * tokens_per_second
                pos = media_positions(grid, merge, factor)
                pos = pos.to(emb.device, non_blocking=True).index_select(0, index)
                out.append(torch.cat([kept, encode_positions(pos, kept)], dim=1))
                last.append(index)
        self.tokenreduce_last = last
        return tuple(out)

    def _encode_videos(self, inp) -> list[torch.Tensor]:
        """The vision tower over a step's videos, in :func:`encoder_chunks` of their dense token count."""
        grid = inp["video_grid_thw"]
        if inp["type"] != "pixel_values_videos":
            return list(self._process_video_input(inp))
        merge = self.config.vision_config.spatial_merge_size
        patches = grid.prod(-1).tolist()
        starts = [0, *torch.tensor(patches).cumsum(0).tolist()]
        out: list[torch.Tensor] = []
        for first, end in encoder_chunks([p // merge**2 for p in patches],
                                         getattr(self, "tokenreduce_encoder_budget", None)):
            chunk = {"type": inp["type"], "video_grid_thw": grid[first:end],
                     "pixel_values_videos": inp["pixel_values_videos"][starts[first]:starts[end]]}
            out.extend(self._process_video_input(chunk))
        return out

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int):
        """Strip the position channels and write the prompt's M-RoPE positions from them. All on the
        host: one device-to-host copy of the small position channels per call. Without settings this is
        vLLM's own (Qwen2.5-VL's EVS with ``--video-pruning-rate``)."""
        if self.tokenreduce is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        embeds, channels = split_positions(multimodal_embeddings)
        positions, delta = recompute_mrope_positions(
            prompt_ids(input_ids), channels, mrope_positions.cpu(), num_computed_tokens,
            self.config.vision_start_token_id, self.config.image_token_id, self.config.video_token_id)
        return embeds, positions.to(mrope_positions.device), int(delta)

    def get_encoder_cudagraph_config(self):
        """The encoder CUDA-graph path skips ``embed_multimodal``'s post-processing: off when reducing
        (vLLM's EVS does the same)."""
        config = super().get_encoder_cudagraph_config()
        return dataclasses.replace(config, modalities=[]) if self.tokenreduce is not None else config


class Qwen2VLProcessor(_QwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class Qwen2_5_VLProcessor(_QwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(Qwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class Qwen2VL(_QwenReduce, Qwen2VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenreduce_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(Qwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class Qwen2_5_VL(_QwenReduce, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenreduce_init(vllm_config)
