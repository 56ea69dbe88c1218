"""Original positions of a media item (3-D M-RoPE and 1-D), their exact encoding in embedding channels, and
the 1-D prompt positions of a reduced prompt with their rewrite after the encoder."""

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


def sequence_positions(n_tokens: int, runs: list[tuple[int, int, int]]) -> tuple[torch.Tensor, int]:
    """1-D RoPE positions of a prompt whose media runs ``(offset, placeholders, dense tokens)`` hold fewer
    tokens than in the dense prompt, as ``[3, N]`` M-RoPE rows (all equal, which is exactly 1-D RoPE) and
    the offset of the positions after the prompt. Every token after a run gets its dense-prompt position;
    a run's own tokens count up from the run's dense start until :func:`rewrite_media_positions` writes
    the kept tokens' original offsets."""
    positions = torch.arange(n_tokens)
    for offset, length, dense in runs:
        positions[offset + length:] += dense - length
    return positions.expand(3, -1).clone(), sum(dense - length for _, length, dense in runs)


def rewrite_media_positions(positions: torch.Tensor, input_ids: torch.Tensor, media_ids: list[int],
                            num_computed_tokens: int, channels: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Write the original 1-D positions of the media rows of one prefill step. ``channels`` holds, per
    media embedding of the step (in prompt order, possibly a slice of an item under chunked prefill),
    ``[4, n]``: each row's original offset in its item and its rank among the item's kept rows. The
    step's embedding rows are the prompt's first media tokens from ``num_computed_tokens`` on; a row of
    rank r sits r tokens after its item's first kept token, whose offset is 0 (the first frame is
    always kept), so its item starts at that token's position. Returns the positions and the offset of
    the positions after the prompt."""
    n = input_ids.numel()
    if channels:
        original, rank = torch.cat([c[0] for c in channels]), torch.cat([c[1] for c in channels])
        media = torch.isin(input_ids, torch.tensor(media_ids)).nonzero().flatten()
        rows = media[media >= num_computed_tokens][:original.numel()]
        positions = positions.clone()
        positions[:, rows] = positions[0, rows - rank] + original
    return positions, int(positions.max()) + 1 - n if n else 0
