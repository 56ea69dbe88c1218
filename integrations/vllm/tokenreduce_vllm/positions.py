"""Positions of a reduced prompt for M-RoPE (Qwen's 3-D, and LLaVA-OneVision's 1-D as M-RoPE with equal rows):
the prompt's positions before the encoder runs (:func:`prompt_positions`: text at its dense-prompt
positions), each media embedding row's grid position and rank carried exactly in extra embedding
channels, and the rewrite of a prefill step's media rows from them (:func:`rewrite_media_positions`)."""

from __future__ import annotations

import torch


def grid_positions(grid_thw, merge: int, t_factor: float) -> torch.Tensor:
    """``[3, T*H*W]`` long: (t, h, w) of each token of a (t, h, w) patch grid merged by ``merge``, as if
    the item started at position 0, in the tokens' (raster) order. The temporal index is
    ``floor(t * t_factor)`` with the float factor, as vLLM's ``get_mrope_input_positions`` computes the
    dense prompt (vLLM's EVS casts seconds-per-grid to an integer first and offsets the following text
    by the grid width only; both differ from the dense positions, so they are not copied)."""
    t, h, w = (int(v) for v in grid_thw)
    h, w = h // merge, w // merge
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))
    grid = grid.reshape(3, -1)
    grid[0] = (grid[0].double() * t_factor).long()
    return grid


def media_channels(grid: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, 4]`` long: for each of an item's embedding rows (the ``kept`` grid indices, all when None),
    its (t, h, w) in the item's grid and its rank among the item's rows, which locates it in the prompt
    whatever prefill step carries it (:func:`rewrite_media_positions`)."""
    rows = grid if kept is None else grid.index_select(1, kept.to(grid.device))
    return torch.cat([rows, torch.arange(rows.shape[1], device=grid.device)[None]]).T.contiguous()


def encode_positions(positions: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[n, 4]`` non-negative positions (< 65536) as ``[n, 8]`` channels in ``like``'s dtype and device:
    high and low base-256 digits, exact in every float dtype vLLM runs in."""
    positions = positions.to(like.device)
    return torch.cat([positions // 256, positions % 256], dim=1).to(like.dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`encode_positions`: ``[n, 8]`` channels to ``[4, n]`` long positions."""
    digits = channels.round().long()
    return (digits[:, :4] * 256 + digits[:, 4:]).T.contiguous()


def prompt_positions(n_tokens: int, items: list[tuple[int, torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    """M-RoPE positions ``[3, n_tokens]`` of a prompt whose media ``items`` ``(offset, rows, extent)`` may
    hold fewer tokens than in the dense prompt, and the offset of the positions after the prompt.

    Exactly one column per prompt token (vLLM's V2 runner writes them into rows of ``max_model_len``).
    Text follows vLLM's dense rule: it counts on from the largest position before it plus one, so text
    after an item sits ``extent`` (the item's dense grid's largest position plus one) past the item's
    start, wherever the item's tokens are. An item's ``rows`` (``[3, placeholders]``, relative to its
    start) are final when the item is not reduced; a reduced video's rows are provisional until
    :func:`rewrite_media_positions` places its kept tokens, except a last row that is final (LLaVA's
    newline) or followed by text. Nothing here depends on the encoder, so a step that finds the prompt's
    media in the prefix cache gets the same positions as one that encodes them."""
    positions = torch.empty(3, n_tokens, dtype=torch.long)
    nxt, i = 0, 0
    for offset, rows, extent in sorted(items, key=lambda item: item[0]):
        positions[:, i:offset] = nxt + torch.arange(offset - i)
        nxt += offset - i
        positions[:, offset:offset + rows.shape[1]] = nxt + rows
        i, nxt = offset + rows.shape[1], nxt + extent
    positions[:, i:] = nxt + torch.arange(n_tokens - i)
    return positions, nxt - i  # the position after the prompt, nxt + (n_tokens - i), minus n_tokens


def rewrite_media_positions(positions: torch.Tensor, input_ids: torch.Tensor, media_ids: list[int],
                            num_computed_tokens: int, channels: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Write the dense-prompt positions of the media rows of one prefill step. ``channels`` holds, per
    media embedding of the step (in prompt order, possibly a slice of an item under chunked prefill),
    ``[4, n]``: each row's (t, h, w) in its item's grid and its rank among the item's rows. The step's
    embedding rows are the prompt's first media tokens from ``num_computed_tokens`` on; a row of rank r
    belongs to the item starting r tokens earlier, whose positions start one past the largest position
    of the token before it (text, or a media row that :func:`prompt_positions` made final), so the
    result never depends on which step carries which rows, and rewriting a row twice changes nothing.
    Returns the positions and the offset of the positions after the prompt (from its last token, which
    is final)."""
    n = input_ids.numel()
    if channels:
        thw, rank = torch.cat([c[:3] for c in channels], dim=1), torch.cat([c[3] for c in channels])
        media = torch.isin(input_ids, torch.tensor(media_ids)).nonzero().flatten()
        rows = media[media >= num_computed_tokens][:rank.numel()]
        first = rows - rank
        before = positions[:, (first - 1).clamp(min=0)].max(dim=0).values + 1
        positions = positions.clone()
        positions[:, rows] = torch.where(first > 0, before, 0) + thw
    return positions, int(positions[:, -1].max()) + 1 - n if n else 0
