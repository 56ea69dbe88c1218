"""What the plugin's model classes share: the engine's settings, the per-request settings in the
multimodal processor, and the encoder chunking by dense token count.

Without tokenreduce settings every class behaves exactly as vLLM's. With them the multimodal processor
writes each video's placeholders with the reduced count, fixed from the retention and the video's frame
grid before any pixel is seen (as vLLM's EVS does), and ``embed_multimodal`` runs the vision tower as
usual, then keeps (or merges into) that many tokens per video with
:func:`tokenreduce.methods.pre_llm.reduce_video`, the function the Hugging Face side uses.

Positions: the model's ``get_mrope_input_positions`` gives every prompt token its dense-prompt position
before any encoder runs (:func:`positions.prompt_positions`), so a step that finds a video in the prefix
cache needs nothing from the encoder; every multimodal embedding carries its grid position and rank in
``POSITION_CHANNELS`` extra channels, from which the model's ``recompute_mrope_positions`` (called by the
runner, see runner_hook) places the kept tokens of the step that carries them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig

from tokenreduce.methods.pre_llm import video_token_count

from .positions import decode_positions, rewrite_media_positions
from .settings import CONFIG_KEY, Settings, for_request, from_hf_config, parse, split_request

POSITION_CHANNELS = 8  # 4 values, each as two base-256 digits: exact in bf16/fp16
FIELD = "tokenreduce_settings"  # per-video multimodal field: the settings that fixed its placeholder count


def engine_settings(vllm_config) -> Settings | None:
    extra = vllm_config.additional_config
    return parse(extra.get(CONFIG_KEY)) if isinstance(extra, dict) else None


def video_settings(kwargs: Mapping[str, object], videos: int, default: Settings) -> list[Settings]:
    """Each video's settings from the ``FIELD`` rows the processor attached (the engine's if absent)."""
    rows = kwargs.get(FIELD)
    if rows is None:
        return [default] * videos
    return [Settings.from_tensor(row) for row in rows]


def split_positions(multimodal_embeddings: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The embeddings without their ``POSITION_CHANNELS``, and each one's decoded ``[4, n]`` positions, on
    the host (one device-to-host copy of the small channels for the whole call)."""
    embeds = [mm[:, :-POSITION_CHANNELS] for mm in multimodal_embeddings]
    if not multimodal_embeddings:
        return embeds, []
    packed = torch.cat([mm[:, -POSITION_CHANNELS:] for mm in multimodal_embeddings]).cpu()
    return embeds, list(decode_positions(packed).split([mm.shape[0] for mm in multimodal_embeddings], dim=1))


def prompt_ids(input_ids) -> torch.Tensor:
    """A request's prompt token ids (list or tensor) as a long tensor on the host."""
    return (input_ids.cpu() if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids)).long()


def batches_videos(settings: Settings) -> bool:
    """Whether a step's videos share vision-tower calls (``encoder_batch`` "budget", or "auto" off CPUs)."""
    from vllm.platforms import current_platform

    if settings.encoder_batch == "auto":
        return not current_platform.is_cpu()
    return settings.encoder_batch == "budget"


def encoder_budget(vllm_config) -> int:
    """vLLM's encoder budget for this engine (the dense token count its memory profile sized the
    encoder for), computed as both model runners compute it."""
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget

    return MultiModalBudget(vllm_config, MULTIMODAL_REGISTRY, enable_cache=False).get_encoder_budget()


def encoder_chunks(tokens: list[int], budget: int | None) -> list[tuple[int, int]]:
    """``(first, end)`` item ranges, consecutive, whose summed dense ``tokens`` fit ``budget`` (at least
    one item each; one range for all without a budget).

    vLLM's scheduler admits videos by their reduced count, so a step's videos could exceed the memory
    vLLM profiled for the encoder (dense counts). Its V1 runner therefore encodes videos one at a time
    whenever pruning is on; its V2 runner sends all of a step's videos in one call. The models split a
    step's videos themselves (:meth:`ReducingModel._video_chunks`), under both runners: one per call, or
    with ``encoder_batch`` "budget" in chunks by this: the same peak as a dense server's batch."""
    if not budget:
        return [(0, len(tokens))]
    chunks, first = [], 0
    while first < len(tokens):
        end, total = first + 1, tokens[first]
        while end < len(tokens) and total + tokens[end] <= budget:
            total += tokens[end]
            end += 1
        chunks.append((first, end))
        first = end
    return chunks


class RequestSettings:
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


class ReducingModel:
    """What the plugin's model classes share: the engine's settings, the split of a step's videos into
    vision-tower calls, and the position rewrite after the encoder."""

    def _tokenreduce_init(self, vllm_config, positions: bool) -> None:
        self.tokenreduce = engine_settings(vllm_config)
        self.tokenreduce_positions = self.tokenreduce is not None and positions  # read by runner_hook
        if self.tokenreduce_positions:
            self.supports_multimodal_pruning = True
        self.tokenreduce_vllm_config = vllm_config
        self.tokenreduce_encoder_budget: int | None = None  # computed on first use (the profile run)
        self.tokenreduce_last: list[torch.Tensor] = []  # kept flat indices of each video of the last call

    def _video_chunks(self, tokens: list[int]) -> list[tuple[int, int]]:
        """``(first, end)`` ranges of a step's videos (``tokens``: their dense token counts) per tower call."""
        if not batches_videos(self.tokenreduce):
            return [(i, i + 1) for i in range(len(tokens))]
        if self.tokenreduce_encoder_budget is None:
            self.tokenreduce_encoder_budget = encoder_budget(self.tokenreduce_vllm_config)
        return encoder_chunks(tokens, self.tokenreduce_encoder_budget)

    def _rewrite_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                           mrope_positions: torch.Tensor, num_computed_tokens: int, media_ids: list[int]):
        """``recompute_mrope_positions`` as both runners call it (V1: the prompt ids as a list and the
        positions on the host, every step; V2: both on the device, in steps that carry embeddings):
        strip the position channels and place the step's media rows, on the host (one small
        device-to-host copy per request step that carries embeddings)."""
        if not multimodal_embeddings:
            delta = int(mrope_positions[:, -1].max()) + 1 - mrope_positions.shape[1]
            return [], mrope_positions, delta
        from vllm.utils.gpu_sync_debug import gpu_sync_allowed

        with gpu_sync_allowed():
            embeds, channels = split_positions(multimodal_embeddings)
            positions, delta = rewrite_media_positions(mrope_positions.cpu(), prompt_ids(input_ids), media_ids,
                                                       num_computed_tokens, channels)
        return embeds, positions.to(mrope_positions.device), delta


def check_media_followed(prompt: list[int], placeholders, media_ids: list[int]) -> None:
    """Refuse a reduced video that ends the prompt or that another media item follows directly: the
    positions of what follows a video come from its dense grid only through a text token after it
    (Qwen's chat template writes ``<|vision_end|>`` there)."""
    for place in placeholders:
        end = place.offset + place.length
        if end >= len(prompt) or prompt[end] in media_ids:
            raise ValueError("tokenreduce in vLLM needs a text token after each reduced video (such as "
                             "<|vision_end|>, which the chat template writes); this prompt has a video "
                             + ("at its end" if end >= len(prompt) else f"directly followed by another media item "
                                f"at token {end}"))
