"""A fingerprint of what decides an LLM's keys and values, so that a KV store never mixes two models' KV.

Class name, checkpoint path and shapes do not identify the KV a model computes: a fine-tune with the
base's embeddings (frozen-embedding LoRA), a model built from a config (no path), or the same weights
with another ``rope_theta`` all share them, and reusing one's KV in the other is silently wrong. The
fingerprint hashes (sha256) the text config (every field that can change the computation: RoPE, norms,
activations; bookkeeping fields such as token ids and labels are left out), the rotary frequencies and
attention scaling actually in use, and, for every parameter of the token embedding and the decoder
layers, its name, shape, dtype and 256 elements at seeded random positions. Any dense change of a
weight (a fine-tune, a merged LoRA delta) changes the sampled elements, and sampling reads a few hundred
elements per tensor instead of every weight. It is taken when the model is patched: re-patch after
loading other weights into it (or give SemShare an explicit ``model_id``).
"""

from __future__ import annotations

import hashlib
import json

import torch

from .model import TextParts

SAMPLES = 256  # elements sampled per parameter tensor
_BOOKKEEPING = frozenset({
    "architectures", "bos_token_id", "chunk_size_feed_forward", "dtype", "eos_token_id", "id2label",
    "initializer_range", "is_encoder_decoder", "label2id", "output_attentions", "output_hidden_states",
    "pad_token_id", "problem_type", "return_dict", "tie_word_embeddings", "tokenizer_class", "torch_dtype",
    "transformers_version", "use_cache",
})  # config fields that cannot change keys or values (the weights' dtype is hashed with the weights)


def config_text(config) -> str:
    """The config fields that can change the computation, as canonical JSON (private ``_`` fields, such as
    the path and the attention backend, are not among them)."""
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _BOOKKEEPING}
    return json.dumps(fields, sort_keys=True, default=str)


def _sample(p: torch.Tensor) -> torch.Tensor:
    if p.device.type == "meta":
        raise ValueError("cannot fingerprint a model whose weights are offloaded (on the meta device); give semshare "
                         "model_id='...' to name the model instead")
    flat = p.detach().reshape(-1)
    n = flat.numel()
    if n <= SAMPLES:
        return flat.double()
    index = torch.randint(0, n, (SAMPLES,), generator=torch.Generator().manual_seed(n))
    return flat[index.to(flat.device)].double()


def fingerprint(parts: TextParts) -> str:
    """sha256 hex digest of ``parts``' KV-relevant config, rotary embedding and sampled weights."""
    digest = hashlib.sha256(config_text(parts.config).encode())
    samples = []
    with torch.no_grad():
        rotary = parts.rotary
        if rotary is not None:
            digest.update(repr(getattr(rotary, "attention_scaling", None)).encode())
            samples += [b.detach().double().reshape(-1) for _, b in sorted(rotary.named_buffers())]
        for prefix, module in [("embed", parts.embed)] + [(f"layers.{i}", m) for i, m in enumerate(parts.layers)]:
            for name, p in module.named_parameters():
                digest.update(f"{prefix}.{name}:{tuple(p.shape)}:{p.dtype};".encode())
                samples.append(_sample(p).to(samples[0].device if samples else p.device))
        if samples:
            digest.update(torch.cat(samples).cpu().numpy().tobytes())
    return digest.hexdigest()
