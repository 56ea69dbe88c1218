"""Tiny random-weight Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision that vLLM's CPU build accepts (head_dim 64
in both towers), each saved with a byte-level BPE tokenizer, a chat template and its full processor, so
they load offline. For the plugin's tests and ``benchmarks/serve.py --quick``; timing-free."""

from __future__ import annotations

import json
import os
from pathlib import Path

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")
QWEN_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' or c['type'] == 'video_url' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}")
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CORPUS = ("describe the video what happens in the image hello assistant user the camera moves a square "
          "frame colour red green blue left right up down zero one two three four five six seven eight nine ")


def make_tokenizer(special: list[str]):
    """A byte-level BPE tokenizer (320 entries) trained on a short corpus, with ``special`` tokens,
    ``<|endoftext|>`` and ``<|pad|>``; returns it and its vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = ["<|endoftext|>", "<|pad|>", *special]
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=extra, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   additional_special_tokens=special)
    return fast, fast.get_vocab()


def _text_config(tok, ids: dict[str, int]) -> dict:
    return dict(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|pad|>"], bos_token_id=None)


def _qwen(root: Path, family: str) -> Path:
    import transformers as T

    tok, ids = make_tokenizer(QWEN_TOKENS)
    tok.chat_template = QWEN_TEMPLATE
    token_ids = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                     vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}  # sums to head_dim / 2
    text = dict(**_text_config(tok, ids), rope_parameters=rope)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=128, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = T.Qwen2VLConfig(text_config=text, vision_config=vision, **token_ids)
        model_cls, proc_cls = T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=128, out_hidden_size=128, intermediate_size=256, num_heads=2,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[1])
        config = T.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **token_ids)
        model_cls, proc_cls = T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor
    out = root / family
    model_cls(config).save_pretrained(out)
    images = T.Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=MEAN,
                                     image_std=STD, size={"shortest_edge": 28 * 28, "longest_edge": 112 * 112})
    videos = T.Qwen2VLVideoProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, image_mean=MEAN,
                                     image_std=STD, size={"shortest_edge": 4 * 28 * 28, "longest_edge": 64 * 28 * 28},
                                     do_sample_frames=False)
    proc_cls(image_processor=images, tokenizer=tok, video_processor=videos,
             chat_template=QWEN_TEMPLATE).save_pretrained(out)
    return out


def _llava_onevision(root: Path) -> Path:
    import transformers as T
    from safetensors.torch import load_file, save_file

    tok, ids = make_tokenizer(["<image>", "<video>"])
    template = QWEN_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<image>").replace(
        "<|vision_start|><|video_pad|><|vision_end|>", "<video>")
    tok.chat_template = template
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    config = T.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14),
        text_config=dict(_text_config(tok, ids), model_type="qwen2"), image_token_index=ids["<image>"],
        video_token_index=ids["<video>"], vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints)
    out = root / "llava_onevision"
    T.LlavaOnevisionForConditionalGeneration(config).save_pretrained(out)
    T.LlavaOnevisionProcessor(
        image_processor=T.LlavaOnevisionImageProcessor(size={"height": 56, "width": 56},
                                                       image_grid_pinpoints=pinpoints),
        video_processor=T.LlavaOnevisionVideoProcessor(size={"height": 56, "width": 56}, do_sample_frames=False),
        tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full", chat_template=template,
    ).save_pretrained(out)
    # transformers 5.x saves the SigLIP tower as "vision_tower.embeddings..."; vLLM (like the hub
    # checkpoints) reads "vision_tower.vision_model.embeddings...", and transformers loads both.
    weights = load_file(out / "model.safetensors")
    weights = {(k.replace("vision_tower.", "vision_tower.vision_model.", 1) if k.startswith("vision_tower.") else k): v
               for k, v in weights.items()}
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def make_model(root: str | os.PathLike, family: str, seed: int = 0) -> Path:
    """Build (once) and return the directory of a tiny ``family`` model under ``root``."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    root = Path(root)
    out = root / family
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    torch.manual_seed(seed)
    return _llava_onevision(root) if family == "llava_onevision" else _qwen(root, family)


def placeholder_ids(model_dir: str | os.PathLike) -> tuple[int, int]:
    """(image token id, video token id) of a saved model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("image_token_id", config.get("image_token_index")),
            config.get("video_token_id", config.get("video_token_index")))


def make_video(frames: int = 8, size: int = 56, seed: int = 0):
    """uint8 ``[T, size, size, 3]``: a square moving over a smooth gradient, with a little noise, so that
    most cells barely change between frames and some change a lot (deterministic for a seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([yy, xx, 1 - yy], axis=-1) * 200 + 20
    side = size // 4
    out = []
    for t in range(frames):
        frame = base + rng.normal(0, 2, base.shape)
        y = (t * side // 2) % (size - side)
        x = (t * side // 3 + seed * 5) % (size - side)
        frame[y:y + side, x:x + side] = rng.uniform(0, 255, 3)
        out.append(frame)
    return np.clip(np.stack(out), 0, 255).round().astype(np.uint8)


def video_metadata(frames: int, fps: float = 2.0) -> dict:
    """The metadata vLLM wants beside raw frames (Qwen2.5-VL refuses frames without it)."""
    return {"total_num_frames": frames, "fps": fps, "duration": frames / fps, "frames_indices": list(range(frames)),
            "video_backend": "opencv", "do_sample_frames": False}


def mp4_data_url(frames, fps: float = 2.0) -> str:
    """``data:video/mp4;base64,...`` of ``frames`` (written with OpenCV, which vLLM's video loader reads)."""
    import base64
    import tempfile

    import cv2

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/video.mp4"
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (frames.shape[2], frames.shape[1]))
        for frame in frames:
            writer.write(frame[..., ::-1].copy())
        writer.release()
        with open(path, "rb") as f:
            return "data:video/mp4;base64," + base64.b64encode(f.read()).decode()


def png_data_url(image) -> str:
    """``data:image/png;base64,...`` of a uint8 ``[H, W, 3]`` array."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
