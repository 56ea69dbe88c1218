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
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement
from vllm.multimodal.video_prune.evs import recompute_mrope_positions

from tokenreduce.methods.pre_llm import reduce_video, video_token_count

from .positions import decode_positions, encode_positions, media_positions
from .settings import CONFIG_KEY, Settings, for_request, from_hf_config, parse, split_request

POSITION_CHANNELS = 8  # 4 values (t, h, w, text offset), each as two base-256 digits: exact in bf16/fp16
FIELD = "tokenreduce_settings"  # per-video multimodal field: the settings that fixed its placeholder count


def _settings(vllm_config) -> Settings | None:
    extra = vllm_config.additional_config
    return parse(extra.get(CONFIG_KEY)) if isinstance(extra, dict) else None


def _video_settings(kwargs: Mapping[str, object], videos: int, default: Settings) -> list[Settings]:
    """Each video's settings from the ``FIELD`` rows the processor attached (the engine's if absent)."""
    rows = kwargs.get(FIELD)
    if rows is None:
        return [default] * videos
    return [Settings.from_tensor(row) for row in rows]


class _RequestSettings:
    """Per-request settings in the multimodal processor. A request's ``tokenreduce_method`` and
    ``tokenreduce_retention`` processor kwargs (from ``mm_processor_kwargs``, or ``vllm_xargs`` through
    the request hook) override the engine's; they are checked here (a bad value fails the request before
    it is scheduled), kept out of the HF processor, and attached to every video as the ``FIELD``
    multimodal field, which fixes its placeholder count and tells ``embed_multimodal`` what to keep. vLLM
    hashes processor kwargs into each item's cache key, so a video cached at one retention is never
    reused at another."""

    def _engine_settings(self) -> Settings | None:
        return from_hf_config(self.info.get_hf_config())

    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]):
        settings = for_request(self._engine_settings(), hf_kwargs)
        out = super()._apply_hf_processor_main(mm_items, split_request(hf_kwargs)[1])
        videos = mm_items.get_all_counts().get("video", 0)
        if settings is not None and videos:
            out[FIELD] = settings.to_tensor(videos)
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = dict(super()._get_mm_fields_config(hf_inputs, split_request(hf_processor_mm_kwargs)[1]))
        if FIELD in hf_inputs:
            fields[FIELD] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

    def _video_token_count(self, out_mm_kwargs, item_idx: int, frames: int, cells: int) -> int:
        """A video's placeholder count under its request's settings, which may not keep more than the
        server's: those size vLLM's encoder budget and memory profile."""
        engine = self._engine_settings()
        item = out_mm_kwargs["video"][item_idx]
        settings = Settings.from_tensor(item[FIELD].data) if FIELD in item else engine
        count = video_token_count(settings.method, frames, cells, settings.retention)
        cap = video_token_count(engine.method, frames, cells, engine.retention)
        if count > cap:
            raise ValueError(f"the request's tokenreduce settings ({settings.method}, retention "
                             f"{settings.retention}) keep {count} tokens of a video, more than the server's "
                             f"({engine.method}, retention {engine.retention}: {cap}); a request may only "
                             f"reduce further (start the server with a higher retention to allow more)")
        return count


# ---------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL


class _QwenProcessorMixin(_RequestSettings):
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
            settings = _video_settings(kwargs, len(grids), self.tokenreduce)
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


class LlavaOnevisionProcessor(_RequestSettings, LlavaOnevisionMultiModalProcessor):
    """Video placeholders per item, under each request's settings (the info's count is the server's,
    which vLLM uses for its budgets)."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, split_request(hf_processor_mm_kwargs)[1], out_mm_kwargs)
        if self._engine_settings() is None or "video" not in mm_items:
            return updates
        videos = mm_items.get_items("video", VideoProcessorItems)
        video_token = self.info.get_hf_config().video_token_index

        def video_replacement(item_idx: int) -> list[int]:
            size = videos.get_frame_size(item_idx)
            cells = self.info._get_num_frame_tokens(image_width=size.width, image_height=size.height)
            count = self._video_token_count(out_mm_kwargs, item_idx, videos.get_num_frames(item_idx), cells)
            return [video_token] * (count + 1)  # + the trailing newline

        return [PromptReplacement(modality="video", target=u.target, replacement=video_replacement)
                if u.modality == "video" else u for u in updates]


@MULTIMODAL_REGISTRY.register_processor(LlavaOnevisionProcessor, info=LlavaOnevisionInfo,
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
            settings = _video_settings(kwargs, len(frames), self.tokenreduce)
            for i, (emb, n_frames) in enumerate(zip(self._process_video_pixels(inp), frames, strict=True)):
                emb = emb.reshape(-1, emb.shape[-1])
                body, newline = emb[:-1], emb[-1:]  # the trailing newline belongs to no frame: always kept
                index, kept = reduce_video(settings[i].method, body.view(n_frames, -1, body.shape[-1]),
                                           settings[i].retention)
                out.append(torch.cat([kept, newline]))
                last.append(index)
        self.tokenreduce_last = last
        return tuple(out)
