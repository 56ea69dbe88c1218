"""Tiny random-weight vision-language models and realistic inputs for tests, demos and benchmarks.

Every family is built from a config (no hub access): a 4-layer GQA text model (hidden 64, vocab 512) and a
2-layer vision tower whose native frame is 56x56. :data:`DINOV2_LLAVA` is LLaVA-NeXT-Video with a 3-layer
DINOv2 tower instead (the organism's architecture: two tower layers concatenated, CLS dropped, 2x2 max
pooling). Pixel inputs come from the family's real transformers image/video processors; ``input_ids`` are
built directly with the exact number of visual placeholder tokens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import transformers  # model and processor classes load lazily, on first use

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video")
DINOV2_LLAVA = "llava_next_video_dinov2"  # a tower variant of llava_next_video (tokenreduce.organism's shape)
MODELS: tuple[str, ...] = (*FAMILIES, DINOV2_LLAVA)  # every tiny model tiny_model builds

FRAME_SIZE = 56  # native frame side of every tiny vision tower
VIDEO_FPS = 2.0  # frame rate assumed for Qwen2.5-VL's ``second_per_grid_ts``
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VISION_START_ID, VISION_END_ID, IMAGE_ID, VIDEO_ID = 508, 509, 510, 511
PREFIX_LEN = 4  # text tokens before the visual run

_CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
    "llava_next_video": ("LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration"),
    DINOV2_LLAVA: ("LlavaNextVideoConfig", "LlavaNextVideoForConditionalGeneration"),
}
_TEXT = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
_LLAVA_TOWER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
_LLAVA_TOWER.update(image_size=FRAME_SIZE, patch_size=7)  # 8x8 patches per frame
# DINOv2 ViT (8x8 patches + CLS per 56 px frame) with per-channel layer-scale (set by tiny_model), read by
# LLaVA-NeXT-Video as the organism reads it (tokenreduce.organism.model.config)
_DINOV2_TOWER = dict(model_type="dinov2", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
                     image_size=FRAME_SIZE, patch_size=7)
_DINOV2_LLAVA = dict(vision_feature_layer=[-2, -1], vision_feature_select_strategy="default",
                     spatial_pool_mode="max")
_PINPOINTS = [[FRAME_SIZE * h, FRAME_SIZE * w] for h in (1, 2) for w in (1, 2)]


def tiny_config(family: str, **overrides) -> PretrainedConfig:
    """Config of a tiny ``family`` model; ``text_config``/``vision_config`` dict overrides are merged."""
    if family not in _CLASSES:
        raise ValueError(f"unknown family {family!r}, expected one of {MODELS}")
    text = {**_TEXT, **overrides.pop("text_config", {})}
    hidden = text["hidden_size"]
    qwen_vision = dict(depth=2, num_heads=2, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    if family.startswith("qwen"):
        half = hidden // text["num_attention_heads"] // 2  # rotary frequencies per head, split over (t, h, w)
        mrope = [half - 2 * ((half - half // 4) // 2)] + [(half - half // 4) // 2] * 2
        text.setdefault("rope_parameters", dict(rope_type="default", rope_theta=1e4, mrope_section=mrope))
        ids = dict(vision_start_token_id=VISION_START_ID, vision_end_token_id=VISION_END_ID)
        ids.update(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID)
    else:
        ids = dict(image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, image_grid_pinpoints=_PINPOINTS)
    if family == "qwen2_vl":
        vision = {**qwen_vision, "embed_dim": 32, "hidden_size": hidden, "mlp_ratio": 2}
    elif family == "qwen3_vl":  # deepstack features feed LLM layers 0 and 1
        vision = {**qwen_vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": hidden}
        vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        text["rope_parameters"]["mrope_interleaved"] = True
        text["head_dim"] = hidden // text["num_attention_heads"]
    elif family == "qwen2_5_vl":
        vision = {**qwen_vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": hidden}
        vision.update(window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)  # layer 0 windowed
    elif family == "llava_onevision":
        text["model_type"] = "qwen2"
        vision = {**_LLAVA_TOWER, "model_type": "siglip_vision_model", "vision_use_head": False}
    elif family == DINOV2_LLAVA:
        text["model_type"] = "llama"
        vision = dict(_DINOV2_TOWER)
        overrides = {**_DINOV2_LLAVA, **overrides}
    else:
        text["model_type"] = "llama"
        vision = {**_LLAVA_TOWER, "model_type": "clip_vision_model", "projection_dim": 32}
    vision.update(overrides.pop("vision_config", {}))
    if family in ("llava_next_video", DINOV2_LLAVA):  # informational lengths, kept consistent with the tower
        side, stride = vision["image_size"] // vision["patch_size"], overrides.get("spatial_pool_stride", 2)
        ids.update(image_seq_length=side**2, video_seq_length=(side // stride) ** 2)
    return getattr(transformers, _CLASSES[family][0])(text_config=text, vision_config=vision, **{**ids, **overrides})


def tiny_model(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides,
) -> PreTrainedModel:
    """Tiny ``*ForConditionalGeneration`` model (``family``: one of :data:`MODELS`) in eval mode; weights depend
    only on ``seed``."""
    config = tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cls = getattr(transformers, _CLASSES[family][1])
        model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
        if family == DINOV2_LLAVA:  # per-channel layer-scale, as trained DINOv2 has (init: one constant)
            with torch.no_grad():
                for layer in model.model.vision_tower.encoder.layer:
                    for scale in (layer.layer_scale1, layer.layer_scale2):
                        scale.lambda1.uniform_(0.2, 1.0)
    return model.eval()


def visual_token_ids(model: PreTrainedModel) -> tuple[int | None, int | None]:
    """(image token id, video token id) read from the model config."""
    return getattr(model.config, "image_token_id", None), getattr(model.config, "video_token_id", None)


def make_frames(
    num_frames: int = 8, size: int = FRAME_SIZE, *, seed: int = 0, static: bool = False
) -> np.ndarray:
    """uint8 ``[T, size, size, 3]`` video: a window panning across scikit-image's astronaut photograph.

    ``seed`` picks the pan path; ``static=True`` repeats the first frame, so every later frame is a duplicate.
    """
    from skimage.data import astronaut
    from skimage.transform import resize

    photo = astronaut()
    window = min(photo.shape[:2]) // 2
    room = np.array(photo.shape[:2]) - window
    rng = np.random.default_rng(seed)
    start, end = rng.uniform(0, 0.25, size=(2, 2)) * room
    path = np.linspace(start, room - end, num_frames).round().astype(int)
    if rng.random() < 0.5:
        path = path[::-1]
    if static:
        path = path[:1].repeat(num_frames, axis=0)
    crops = [photo[y : y + window, x : x + window] for y, x in path]
    frames = [resize(crop, (size, size), anti_aliasing=True, preserve_range=True) for crop in crops]
    return np.stack(frames).round().astype(np.uint8)


def _anyres_tokens(config: PretrainedConfig, height: int, width: int) -> int:
    """LLaVA-NeXT/OneVision image tokens: base view + unpadded tiled grid with one newline per row."""
    tower = config.vision_config
    side = tower.image_size // tower.patch_size
    from transformers.image_processing_utils import select_best_resolution

    best_h, best_w = select_best_resolution((height, width), config.image_grid_pinpoints)
    cur_h, cur_w = best_h // tower.image_size * side, best_w // tower.image_size * side
    if width / height > cur_w / cur_h:
        cur_h -= (cur_h - int(round(height * (cur_w / width), 7))) // 2 * 2
    else:
        cur_w -= (cur_w - int(round(width * (cur_h / height), 7))) // 2 * 2
    if config.model_type == "llava_onevision":
        ratio = math.sqrt(
            cur_h * cur_w / (int(config.vision_aspect_ratio.removeprefix("anyres_max_")) * side**2)
        )
        if ratio > 1.1:
            cur_h, cur_w = int(cur_h // ratio), int(cur_w // ratio)
    return side * side + cur_h * (cur_w + 1)


def _pixels(config: PretrainedConfig, videos: list | None, images: list | None, max_pixels: int
            ) -> tuple[dict, list[int]]:
    """Real processor outputs for the visual inputs and the placeholder count of each sample."""
    family, tower, is_video = config.model_type, config.vision_config, videos is not None
    if family.startswith("qwen"):
        kwargs = {"patch_size": tower.patch_size, "temporal_patch_size": tower.temporal_patch_size}
        kwargs.update(merge_size=tower.spatial_merge_size, min_pixels=FRAME_SIZE**2, max_pixels=max_pixels)
        if is_video:  # cap_pixels_per_frame must be explicit, else transformers warns about a future default
            processor = transformers.Qwen2VLVideoProcessor(**kwargs, cap_pixels_per_frame=False)
            out = dict(processor(videos, return_tensors="pt"))
            grid = out["video_grid_thw"]
            if family == "qwen2_5_vl":
                out["second_per_grid_ts"] = torch.full((len(videos),), tower.temporal_patch_size / VIDEO_FPS)
        else:
            out = dict(transformers.Qwen2VLImageProcessor(**kwargs)(images, return_tensors="pt"))
            grid = out["image_grid_thw"]
        return out, (grid.prod(-1) // tower.spatial_merge_size**2).tolist()
    side = tower.image_size // tower.patch_size
    square = {"height": tower.image_size, "width": tower.image_size}
    shortest = {"shortest_edge": tower.image_size}
    if family == "llava_onevision" and is_video:
        out = dict(transformers.LlavaOnevisionVideoProcessor(size=square)(videos, return_tensors="pt"))
        per_frame, newline = math.ceil(side / 2) ** 2, 1
    elif is_video:
        processor = transformers.LlavaNextVideoVideoProcessor(size=shortest, crop_size=square)
        out = dict(processor(videos, return_tensors="pt"))
        per_frame, newline = (side // config.spatial_pool_stride) ** 2, 0
    else:
        grid = {"image_grid_pinpoints": config.image_grid_pinpoints}
        if family == "llava_onevision":
            processor = transformers.LlavaOnevisionImageProcessor(size=square, **grid)
        else:
            processor = transformers.LlavaNextImageProcessor(size=shortest, crop_size=square, **grid)
        out = dict(processor(images, return_tensors="pt"))
        return out, [_anyres_tokens(config, h, w) for h, w in out["image_sizes"].tolist()]
    return out, [out["pixel_values_videos"].shape[1] * per_frame + newline] * len(videos)


def make_inputs(
    model: PreTrainedModel,
    *,
    videos: list[np.ndarray] | None = None,
    images: list[np.ndarray] | None = None,
    text_lens: list[int] | None = None,
    seed: int = 0,
    max_pixels: int = 224**2,
) -> dict[str, torch.Tensor]:
    """Left-padded batch, one prompt per sample: ``PREFIX_LEN`` text tokens, the sample's visual tokens,
    then ``text_lens[i]`` question tokens (default 8). ``max_pixels`` caps a Qwen-VL frame's pixels (the
    processors' own knob); LLaVA frames always take the tower's native size. Without videos/images the
    prompts are text-only.

    Returns a plain dict for ``model(**inputs)`` / ``model.generate(**inputs)``. LLaVA videos in one batch
    must share their shape (the processor stacks them).
    """
    config = model.config
    family = config.model_type
    if family not in FAMILIES:
        raise ValueError(f"unsupported model type {config.model_type!r}, expected one of {FAMILIES}")
    if videos is not None and images is not None:
        raise ValueError("pass videos or images, not both")
    visuals = videos if videos is not None else images
    batch = len(visuals) if visuals is not None else len(text_lens or [0])
    text_lens = text_lens or [8] * batch
    if len(text_lens) != batch:
        raise ValueError(f"text_lens has {len(text_lens)} entries for a batch of {batch}")
    pixels, counts = _pixels(config, videos, images, max_pixels) if visuals is not None else ({}, [0] * batch)

    is_qwen = config.model_type.startswith("qwen")
    image_id, video_id = visual_token_ids(model)
    token = video_id if videos is not None else image_id
    specials = {PAD_ID, BOS_ID, EOS_ID, image_id, video_id}
    if is_qwen:
        specials |= {config.vision_start_token_id, config.vision_end_token_id}
    vocab = torch.arange(config.text_config.vocab_size)
    allowed = vocab[~torch.isin(vocab, torch.tensor(sorted(specials)))]
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, (count, text_len) in enumerate(zip(counts, text_lens, strict=True)):
        visual = [token] * count
        # Qwen3-VL writes each frame as "<timestamp> <start> tokens <end>"; one random id stands for the timestamp
        frames = int(pixels["video_grid_thw"][i, 0]) if family == "qwen3_vl" and videos is not None else 1
        if is_qwen and count:
            per_frame = [config.vision_start_token_id, *visual[: count // frames], config.vision_end_token_id]
            stamps = allowed[torch.randint(len(allowed), (frames,), generator=gen)].tolist()
            visual = [tok for stamp in stamps for tok in ([stamp] if frames > 1 else []) + per_frame]
        prefix, question = (
            allowed[torch.randint(len(allowed), (n,), generator=gen)] for n in (PREFIX_LEN, text_len)
        )
        rows.append(prefix.tolist() + visual + question.tolist())

    length = max(map(len, rows))
    input_ids = torch.full((batch, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention_mask[i, length - len(row) :] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if is_qwen:  # 0 text, 1 image, 2 video, as the Qwen-VL processors emit
        inputs["mm_token_type_ids"] = torch.zeros_like(input_ids)
        inputs["mm_token_type_ids"][input_ids == image_id] = 1
        inputs["mm_token_type_ids"][input_ids == video_id] = 2
    return {**inputs, **pixels}


def to_device(inputs: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
              ) -> dict[str, torch.Tensor]:
    """The batch on ``device``, pixel tensors cast to the model's ``dtype`` (timings such as Qwen2.5-VL's
    ``second_per_grid_ts`` and all ids keep theirs)."""
    return {k: v.to(device, dtype) if k.startswith("pixel_values") else v.to(device) for k, v in inputs.items()}
