"""Attention masks for reduced rows, in the format the model's attention backend expects."""

from __future__ import annotations

import torch


def select_mask(mask: torch.Tensor | None, q_idx: torch.Tensor, q_valid: torch.Tensor, k_pos: torch.Tensor,
                past: int, padded: bool = True) -> torch.Tensor | None:
    """The model's mask restricted to the rows a reduced layer processes.

    ``mask`` is what the model built for the whole chunk (``[B|1, 1, Lq, past + Lq]``, bool for
    SDPA, additive float for eager) or None (plain causal, no padding). ``q_idx`` ``[B, Lq']``
    are the chunk rows that become queries, ``k_pos`` ``[B, Lk']`` the logical positions of the
    keys this layer attends to (-1 for padding rows). Padding query rows may attend to every key
    so that their (ignored) outputs stay finite. Returns None where plain causal is exact;
    ``padded=False`` (the caller knows there is no padding row) decides that without a host sync.
    """
    k_valid = k_pos >= 0
    q_len, k_len = q_idx.shape[1], k_pos.shape[1]
    if mask is None and (q_len == k_len or q_len == 1) and (
            not padded or (bool(k_valid.all()) and bool(q_valid.all()))):
        return None
    kp = k_pos.clamp(min=0)
    if mask is None:
        allowed = kp[:, None, :] <= (q_idx + past)[:, :, None]
    else:
        m = mask[:, 0].expand(q_idx.shape[0], -1, -1)
        m = m.gather(1, q_idx[:, :, None].expand(-1, -1, m.shape[-1]))
        m = m.gather(2, kp[:, None, :].expand(-1, q_len, -1))
        allowed = m if m.dtype == torch.bool else m == 0
    allowed = (allowed & k_valid[:, None, :]) | ~q_valid[:, :, None]
    if mask is None or mask.dtype == torch.bool:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill_(
        ~allowed, torch.finfo(mask.dtype).min)[:, None]
