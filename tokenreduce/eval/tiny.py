"""A real processor for the tiny random Qwen2-VL model (``tokenreduce.testing``), built offline.

The harness talks to every model through its processor and chat template; the tiny test models
come without one. This builds a ``Qwen2VLProcessor`` from transformers' own classes: a
character-level tokenizer (``tokenizers`` WordLevel over printable ASCII) whose special tokens sit
at the tiny config's ids (pad 0, bos 1, eos 2, vision start/end 508/509, image/video 510/511), the
Qwen2-VL image and video processors with the tiny tower's patch sizes, and a small chat template.
Saved beside the model, ``AutoProcessor``/``AutoModelForImageTextToText`` load the pair like any
checkpoint, so tests run the same code path as real models. Its outputs mean nothing (random weights).
"""

from __future__ import annotations

import string
from pathlib import Path

from ..testing import (
    BOS_ID,
    EOS_ID,
    FRAME_SIZE,
    IMAGE_ID,
    PAD_ID,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    tiny_model,
)

SPECIAL = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID, "<|vision_start|>": VISION_START_ID,
           "<|vision_end|>": VISION_END_ID, "<|image_pad|>": IMAGE_ID, "<|video_pad|>": VIDEO_ID}
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}:{% for c in m['content'] %}"
    "{% if c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_processor(max_pixels: int = 112 * 112):
    """A ``Qwen2VLProcessor`` matching ``tiny_model("qwen2_vl")``; frames are resized to at most
    ``max_pixels`` pixels (112x112: 16 visual tokens per pair of frames)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {c: i + 3 for i, c in enumerate(chars)}
    vocab.update(SPECIAL)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=[k for k in SPECIAL if k.startswith("<|")])
    fast.padding_side = "left"
    sizes = dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=FRAME_SIZE**2, max_pixels=max_pixels)
    video = Qwen2VLVideoProcessor(**sizes, cap_pixels_per_frame=False)  # explicit: silences a transformers warning
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=fast, video_processor=video,
                            chat_template=CHAT_TEMPLATE)


def save_tiny_checkpoint(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny random Qwen2-VL model and its processor to ``folder``; return the folder."""
    folder = Path(folder)
    tiny_model("qwen2_vl", seed=seed).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder
