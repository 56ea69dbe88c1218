"""The model classes the plugin serves: vLLM's own, plus token reduction before the LLM.

Without tokenreduce settings every class behaves exactly as vLLM's. With them:

- the multimodal processor writes each video's placeholders with the reduced count, fixed from the
  retention and the video's frame grid before any pixel is seen (as vLLM's EVS does);
- ``embed_multimodal`` runs the vision tower as usual, then keeps (or merges into) that many tokens per
  video with :func:`tokenreduce.methods.pre_llm.reduce_video`, the function the Hugging Face side uses;
- Qwen2-VL / Qwen2.5-VL (3-D M-RoPE): every multimodal embedding carries its original (t, h, w)
  position in 8 extra channels, which the runner turns into the prompt's positions through
  :meth:`recompute_mrope_positions` (see runner_hook), so kept tokens keep their original positions and
  the text after a video and the generated tokens continue from the dense prompt's positions.
- LLaVA-OneVision (1-D RoPE): the kept tokens take consecutive positions (vLLM numbers a prompt's
  positions by index; it has no per-token position hook for 1-D RoPE models).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
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

from tokenreduce.methods.pre_llm import reduce_video, video_token_count

from .positions import decode_positions, encode_positions, media_positions
from .settings import CONFIG_KEY, Settings, from_hf_config, parse

POSITION_CHANNELS = 8  # 4 values (t, h, w, text offset), each as two base-256 digits: exact in bf16/fp16


def _settings(vllm_config) -> Settings | None:
    extra = vllm_config.additional_config
    return parse(extra.get(CONFIG_KEY)) if isinstance(extra, dict) else None


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL


class _QwenProcessorMixin:
    """Video placeholders: ``video_token_count`` of the (t, h/merge, w/merge) grid."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        settings = from_hf_config(hf_config)
        if settings is None:
            return updates
        merge = hf_config.vision_config.spatial_merge_size
        video_token = hf_config.video_token_id

        def video_replacement(item_idx: int) -> list[int]:
            t, h, w = map(int, out_mm_kwargs["video"][item_idx]["video_grid_thw"].data.tolist())
            return [video_token] * video_token_count(settings.method, t, (h // merge) * (w // merge),
                                                     settings.retention)

        return [PromptReplacement(modality="video", target=u.target, replacement=video_replacement)
                if u.modality == "video" else u for u in updates]


class _QwenReduce:
    """Reduction in ``embed_multimodal`` and the position hook for the runner."""

    def _tokenreduce_init(self, vllm_config) -> None:
        self.tokenreduce = _settings(vllm_config)
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
            for i, (emb, grid) in enumerate(zip(self._encode_videos(inp), grids, strict=True)):
                t, h, w = map(int, grid)
                cells = (h // merge) * (w // merge)
                index, kept = reduce_video(self.tokenreduce.method, emb.view(t, cells, -1), self.tokenreduce.retention)
                factor = (seconds[i] if seconds is not None else 1.0) * tokens_per_second
                pos = media_positions(grid, merge, factor)
                pos = pos.to(emb.device, non_blocking=True).index_select(0, index)
                out.append(torch.cat([kept, encode_positions(pos, kept)], dim=1))
                last.append(index)
        self.tokenreduce_last = last
        return tuple(out)

    def _encode_videos(self, inp) -> list[torch.Tensor]:
        """The vision tower over a batch of videos, in consecutive chunks whose *dense* token count fits
        the encoder budget (at least one video per chunk).

        vLLM's V1 runner encodes videos one at a time whenever pruning is on, because its scheduler
        admits videos by their pruned count and a whole step's videos could exceed the memory it
        profiled. The plugin's runner hook turns that split off for our models and this bounds each
        tower call by the budget instead: the same peak as a dense server's batch, and batching kept."""
        grid = inp["video_grid_thw"]
        budget = getattr(self, "tokenreduce_encoder_budget", None)
        if inp["type"] != "pixel_values_videos" or not budget or grid.shape[0] < 2:
            return list(self._process_video_input(inp))
        merge = self.config.vision_config.spatial_merge_size
        patches = grid.prod(-1).tolist()
        out: list[torch.Tensor] = []
        first = pixel = 0
        while first < len(patches):
            last, tokens = first + 1, patches[first] // merge**2
            while last < len(patches) and tokens + patches[last] // merge**2 <= budget:
                tokens += patches[last] // merge**2
                last += 1
            count = sum(patches[first:last])
            chunk = {"type": inp["type"], "video_grid_thw": grid[first:last],
                     "pixel_values_videos": inp["pixel_values_videos"][pixel:pixel + count]}
            out.extend(self._process_video_input(chunk))
            first, pixel = last, pixel + count
        return out

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int):
        """Strip the position channels and write the prompt's M-RoPE positions from them. All on the
        host: one device-to-host copy of the small position channels per call. Without settings this is
        vLLM's own (Qwen2.5-VL's EVS with ``--video-pruning-rate``)."""
        if self.tokenreduce is None:
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        embeds = [mm[:, :-POSITION_CHANNELS] for mm in multimodal_embeddings]
        if not multimodal_embeddings:
            channels = []
        else:
            packed = torch.cat([mm[:, -POSITION_CHANNELS:] for mm in multimodal_embeddings]).cpu()
            channels = list(decode_positions(packed).split([mm.shape[0] for mm in multimodal_embeddings], dim=1))
        ids = input_ids.cpu() if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.long)
        positions, delta = recompute_mrope_positions(
            ids.long(), channels, mrope_positions.cpu(), num_computed_tokens, self.config.vision_start_token_id,
            self.config.image_token_id, self.config.video_token_id)
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


# ---------------------------------------------------------------- LLaVA-OneVision


class LlavaOnevisionInfo(LlavaOnevisionProcessingInfo):
    """Video placeholders: ``video_token_count`` of frames x pooled cells, plus the trailing newline."""

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        settings = from_hf_config(self.get_hf_config())
        if settings is None:
            return super().get_num_video_tokens(image_width=image_width, image_height=image_height,
                                                num_frames=num_frames)
        cells = self._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return video_token_count(settings.method, num_frames, cells, settings.retention) + 1


@MULTIMODAL_REGISTRY.register_processor(LlavaOnevisionMultiModalProcessor, info=LlavaOnevisionInfo,
                                        dummy_inputs=LlavaOnevisionDummyInputsBuilder)
class LlavaOnevision(LlavaOnevisionForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokenreduce = _settings(vllm_config)
        self.tokenreduce_last: list[torch.Tensor] = []

    def embed_multimodal(self, **kwargs: object):
        if self.tokenreduce is None:
            return super().embed_multimodal(**kwargs)
        inputs = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: list[torch.Tensor] = []
        last: list[torch.Tensor] = []
        for modality, inp in inputs.items():
            if inp is None:
                continue
            if modality == "image":
                out.extend(self._process_image_input(inp))
                continue
            pixels = inp["pixel_values_videos"]
            if isinstance(pixels, torch.Tensor):
                frames = [pixels.shape[1]] * pixels.shape[0]
            else:
                frames = [len(video) for video in pixels]
            for emb, n_frames in zip(self._process_video_pixels(inp), frames, strict=True):
                emb = emb.reshape(-1, emb.shape[-1])
                body, newline = emb[:-1], emb[-1:]  # the trailing newline belongs to no frame: always kept
                index, kept = reduce_video(self.tokenreduce.method, body.view(n_frames, -1, body.shape[-1]),
                                           self.tokenreduce.retention)
                out.append(torch.cat([kept, newline]))
                last.append(index)
        self.tokenreduce_last = last
        return tuple(out)
