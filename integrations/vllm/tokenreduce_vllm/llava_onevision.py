"""LLaVA-OneVision (1-D RoPE), with the kept tokens at their original positions.

vLLM numbers a 1-D RoPE model's positions by index and has no per-token hook, but M-RoPE with equal
(t, h, w) positions is exactly 1-D RoPE. So when reducing, the config hook gives the LLM's rope
parameters an ``mrope_section`` (:func:`use_mrope_positions`), this class declares M-RoPE support, and its
prompt positions (:func:`positions.prompt_positions`) and their rewrite after the encoder
(:func:`positions.rewrite_media_positions`, from each embedding's original offset and rank carried in
``POSITION_CHANNELS`` extra channels) give every kept token, every text token after a video and every
generated token its position in the dense prompt, as the Hugging Face path does. A rope type other than
the default (scaled RoPE) has no M-RoPE twin in vLLM: such a model keeps consecutive positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import VideoProcessorItems
from vllm.multimodal.processing import PromptReplacement

from tokenreduce.methods.pre_llm import reduce_video, video_token_count

from .positions import encode_positions, prompt_positions
from .processing import FIELD, ReducingModel, RequestSettings, video_settings
from .settings import from_hf_config, split_request

FRAMES = "tokenreduce_frames"  # per-video multimodal field: its frame count


def use_mrope_positions(text_config) -> bool:
    """Give a default-RoPE LLM config an ``mrope_section`` (any split of the rotary half works: the three
    position rows are equal). False, changing nothing, for other rope types."""
    rope = getattr(text_config, "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        return False
    if "mrope_section" not in rope:
        head = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
        half = int(head * rope.get("partial_rotary_factor", 1.0)) // 2
        rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    return True


class LlavaOnevisionInfo(LlavaOnevisionProcessingInfo):
    """Video placeholders: ``video_token_count`` of frames x pooled cells, plus the trailing newline."""

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int) -> int:
        settings = from_hf_config(self.get_hf_config())
        if settings is None:
            return super().get_num_video_tokens(image_width=image_width, image_height=image_height,
                                                num_frames=num_frames)
        cells = self._get_num_frame_tokens(image_width=image_width, image_height=image_height)
        return video_token_count(settings.method, num_frames, cells, settings.retention) + 1


class LlavaOnevisionProcessor(RequestSettings, LlavaOnevisionMultiModalProcessor):
    """Video placeholders per item, under each request's settings (the info's count is the server's,
    which vLLM uses for its budgets), and each video's frame count as the ``FRAMES`` field, kept on the
    host: the prompt's positions need the video's dense length, and a video's pixels are no longer in
    its item when a later request finds the item in vLLM's processor cache (seen on vLLM 0.32)."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]):
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if FIELD in out:
            videos = mm_items.get_items("video", VideoProcessorItems)
            out[FRAMES] = torch.tensor([videos.get_num_frames(i) for i in range(videos.get_count())])
        return out

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if FRAMES in hf_inputs:
            fields[FRAMES] = MultiModalFieldConfig.batched("video", keep_on_cpu=True)
        return fields

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
class LlavaOnevision(ReducingModel, LlavaOnevisionForConditionalGeneration):
    supports_mrope: ClassVar[bool] = True  # read only when the config declares M-RoPE: when reducing

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokenreduce_init(vllm_config, positions=vllm_config.model_config.uses_mrope)

    def _frame_cells(self) -> int:
        patches = self.config.vision_config.image_size // self.config.vision_config.patch_size
        stride = getattr(self.config, "spatial_pool_stride", 2)
        return math.ceil(patches / stride) ** 2

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
                for emb in self._process_image_input(inp):
                    out.append(self._with_positions(emb, torch.arange(emb.shape[0])))
                continue
            pixels = inp["pixel_values_videos"]
            if isinstance(pixels, torch.Tensor):
                frames = [pixels.shape[1]] * pixels.shape[0]
            else:
                frames = [len(video) for video in pixels]
            settings = video_settings(kwargs, len(frames), self.tokenreduce)
            for i, (emb, n_frames) in enumerate(zip(self._encode_videos(inp, frames), frames, strict=True)):
                emb = emb.reshape(-1, emb.shape[-1])
                body, newline = emb[:-1], emb[-1:]  # the trailing newline belongs to no frame: always kept
                index, kept = reduce_video(settings[i].method, body.view(n_frames, -1, body.shape[-1]),
                                           settings[i].retention)
                original = torch.cat([index.cpu(), torch.tensor([body.shape[0]])])
                out.append(self._with_positions(torch.cat([kept, newline]), original))
                last.append(index)
        self.tokenreduce_last = last
        return tuple(out)

    def _with_positions(self, emb: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """``emb`` with each row's original offset in its item (as equal t, h, w) and its rank, for the
        runner's rewrite."""
        if not self.tokenreduce_positions:
            return emb
        rows = torch.stack([original, original, original, torch.arange(original.numel())], dim=1)
        return torch.cat([emb, encode_positions(rows, emb)], dim=1)

    def _encode_videos(self, inp, frames: list[int]) -> list[torch.Tensor]:
        """The vision tower over a step's videos, in :meth:`_video_chunks` of their dense token count."""
        pixels = inp["pixel_values_videos"]
        out: list[torch.Tensor] = []
        cells = self._frame_cells()
        for first, end in self._video_chunks([f * cells + 1 for f in frames]):
            out.extend(self._process_video_pixels({"type": inp["type"], "pixel_values_videos": pixels[first:end]}))
        return out

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """The dense prompt's positions, one column per prompt token: text and images exactly, a video's
        trailing newline at the end of its dense run (a video's dense length is frames x cells + 1, its
        frames from the ``FRAMES`` field), its other tokens counting up from its start until the step
        that encodes them places them."""
        items = []
        for feature in mm_features:
            length = feature.mm_position.length
            rows = torch.arange(length)
            if feature.modality == "video":
                dense = int(feature.data[FRAMES].data) * self._frame_cells() + 1
                rows[-1] = dense - 1
                items.append((feature.mm_position.offset, rows.expand(3, -1), dense))
            else:
                items.append((feature.mm_position.offset, rows.expand(3, -1), length))
        return prompt_positions(len(input_tokens), items)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int):
        """Strip the position channels and place the step's media rows."""
        return self._rewrite_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens,
                                       [self.config.image_token_index, self.config.video_token_index])
