"""Agreement of a reduced model with the dense one, from the same prompt."""

from __future__ import annotations

import torch


def agreement(dense_logits: torch.Tensor, reduced_logits: torch.Tensor) -> dict[str, float | bool]:
    """Top-1 next-token agreement and ``KL(dense || reduced)`` (nats) of the last-token distributions.

    Both are ``[vocab]`` logits of the last prompt token; computed in float32.
    """
    dense = torch.log_softmax(dense_logits.float(), dim=-1)
    reduced = torch.log_softmax(reduced_logits.float(), dim=-1)
    kl = torch.sum(dense.exp() * (dense - reduced)).clamp(min=0)
    return {"top1_agree": bool(dense.argmax() == reduced.argmax()), "kl": float(kl)}
