"""Qwen2-VL and Qwen2.5-VL (3-D M-RoPE) with reduced videos: the prompt's positions are the dense prompt's
(``get_mrope_input_positions``, one column per prompt token), and every multimodal embedding leaves
``embed_multimodal`` with its original (t, h, w) position and rank in ``POSITION_CHANNELS`` extra
channels, from which ``recompute_mrope_positions`` places the kept tokens (see :mod:`.positions`)."""

from __future__ import annotations

import dataclasses
import threading
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

from tokenreduce.methods.pre_llm import reduce_video

from .positions import encode_positions, grid_positions, media_channels, prompt_positions
from .processing import ReducingModel, RequestSettings, check_media_followed, video_settings
from .settings import split_request

_DUMMY = threading.local()  # set while this thread processes vLLM's dummy inputs


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

    def get_dummy_mm_inputs(self, *args, **kwargs):
        """vLLM's profiling and warm-up prompts (bare placeholders, a video last): never served, exempt
        from :func:`check_media_followed`."""
        _DUMMY.active = True
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _DUMMY.active = False

    def apply(self, inputs, timing_ctx):
        out = super().apply(inputs, timing_ctx)
        if self._engine_settings() is not None and not getattr(_DUMMY, "active", False):
            config = self.info.get_hf_config()
            check_media_followed(out["prompt_token_ids"], out["mm_placeholders"].get("video", []),
                                 [config.image_token_id, config.video_token_id])
        return out


class _QwenReduce(ReducingModel):
    """Reduction in ``embed_multimodal``, the video chunks of a tower call, and the prompt's positions."""

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
                    pos = media_channels(grid_positions(grid, merge, 1.0))
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
                pos = media_channels(grid_positions(grid, merge, factor).to(emb.device, non_blocking=True), index)
                out.append(torch.cat([kept, encode_positions(pos, kept)], dim=1))
                last.append(index)
        self.tokenreduce_last = last
        return tuple(out)

    def _encode_videos(self, inp) -> list[torch.Tensor]:
        """The vision tower over a step's videos, in :meth:`_video_chunks` of their dense token count."""
        grid = inp["video_grid_thw"]
        if inp["type"] != "pixel_values_videos":
            return list(self._process_video_input(inp))
        merge = self.config.vision_config.spatial_merge_size
        patches = grid.prod(-1).tolist()
        starts = [0, *torch.tensor(patches).cumsum(0).tolist()]
        out: list[torch.Tensor] = []
        for first, end in self._video_chunks([p // merge**2 for p in patches]):
            chunk = {"type": inp["type"], "video_grid_thw": grid[first:end],
                     "pixel_values_videos": inp["pixel_values_videos"][starts[first]:starts[end]]}
            out.extend(self._process_video_input(chunk))
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """The dense prompt's positions, one column per prompt token: text and images exactly, a reduced
        video's k-th token at the k-th position of its dense grid until the step that encodes it places
        it (vLLM's own rule, kept without settings, counts the text after a video from the video's dense
        length and would need vLLM's EVS rewrite, which a prefix-cache hit or a step boundary skips)."""
        if self.tokenreduce is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        items = []
        for offset, t, h, w, t_factor in self.iter_mm_grid_thw(mm_features):
            grid = grid_positions((t, h, w), 1, t_factor)
            items.append((offset, grid[:, :lengths[offset]], int(grid.max()) + 1))
        return prompt_positions(len(input_tokens), items)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int):
        """Strip the position channels and place the step's media rows. Without settings this is vLLM's
        own (Qwen2.5-VL's EVS with ``--video-pruning-rate``)."""
        if self.tokenreduce is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        return self._rewrite_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens,
                                       [self.config.image_token_id, self.config.video_token_id])

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
        self._tokenreduce_init(vllm_config, positions=True)


@MULTIMODAL_REGISTRY.register_processor(Qwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class Qwen2_5_VL(_QwenReduce, Qwen2_5_VLForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenreduce_init(vllm_config, positions=True)
