"""Original M-RoPE positions of a media item, and their exact encoding in embedding channels."""

from __future__ import annotations

import torch


def media_positions(grid_thw, merge: int, t_factor: float) -> torch.Tensor:
    """``[T*H*W, 4]`` long: (t, h, w) of each token of a (t, h, w) patch grid merged by ``merge``, as if
    the item started at position 0 (vLLM adds the offset), and in the 4th column the distance from the
    item's start to the first token after it (max position + 1). The temporal index is
    ``floor(t * t_factor)`` with the float factor, as vLLM's ``get_mrope_input_positions`` computes the
    dense prompt (vLLM's EVS casts seconds-per-grid to an integer first and offsets the following text
    by the grid width only; both differ from the dense positions, so they are not copied)."""
    t, h, w = (int(v) for v in grid_thw)
    h, w = h // merge, w // merge
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    grid = grid.reshape(3, -1)
    grid[0] = (grid[0].double() * t_factor).long()
    after = int(grid.max()) + 1
    return torch.cat([grid, torch.full((1, grid.shape[1]), after)]).T.contiguous()


def encode_positions(positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` non-negative positions (< 65536) as ``[n, 8]`` channels in ``like``'s dtype and device:
    high and low base-256 digits, exact in every float dtype vLLM runs in."""
    positions = positions.to(like.device)
    return torch.cat([positions // 256, positions % 256], dim=1).to(like.dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_positions`: ``[n, 8]`` channels to ``[4, n]`` long positions."""
    digits = channels.round().long()
    return (digits[:, :4] * 256 + digits[:, 4:]).T.contiguous()
