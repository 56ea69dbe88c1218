"""The plugin's position arithmetic (pure torch, no vLLM: runs in the main suite too): a reduced prompt's
M-RoPE positions before the encoder (one column per token, text at its dense positions), the rewrite of
the media rows from the embeddings' channels in one prefill step, split across steps at every offset,
rewritten twice, or never (a prefix-cache hit), and the exact channel encoding."""

from __future__ import annotations

import torch
from tokenreduce_vllm.positions import (
    decode_positions,
    encode_positions,
    grid_positions,
    media_channels,
    prompt_positions,
    rewrite_media_positions,
)

MEDIA = 9


def _prompt():
    """2 text tokens, an image (1 x 2 x 2 merged grid, unreduced), 1 text token, a video (2 x 2 x 3
    grid, temporal factor 2, keeping grid indices [0, 4, 7, 11]), 2 text tokens. Returns ids, items for
    :func:`prompt_positions`, the channels of each embedding and the dense positions, written out."""
    ids = torch.tensor([1, 1] + [MEDIA] * 4 + [1] + [MEDIA] * 4 + [1, 1])
    image = grid_positions((1, 4, 4), 2, 1.0)
    video = grid_positions((2, 4, 6), 2, 2.0)  # t in {0, 2}, h in {0, 1}, w in {0, 1, 2}
    kept = torch.tensor([0, 4, 7, 11])
    items = [(2, image, int(image.max()) + 1), (7, video[:, :4], int(video.max()) + 1)]
    channels = [media_channels(image).T, media_channels(video, kept).T]
    # text 0, 1; image at 2 + (0,0,0),(0,0,1),(0,1,0),(0,1,1); text 4; video from 5: kept (t,h,w)
    # (0,0,0) (0,1,1) (2,0,1) (2,1,2); text after from 5 + 3 = 8
    dense = torch.tensor([[0, 1, 2, 2, 2, 2, 4, 5, 5, 7, 7, 8, 9],
                          [0, 1, 2, 2, 3, 3, 4, 5, 6, 5, 6, 8, 9],
                          [0, 1, 2, 3, 2, 3, 4, 5, 6, 6, 7, 8, 9]])
    return ids, items, channels, dense


def test_prompt_positions_before_the_encoder():
    ids, items, _, dense = _prompt()
    positions, delta = prompt_positions(ids.numel(), items)
    assert positions.shape == (3, ids.numel())  # one column per token, whatever the dense length
    text = ids != MEDIA
    assert torch.equal(positions[:, text], dense[:, text])
    assert torch.equal(positions[:, 2:6], dense[:, 2:6])  # an unreduced image is final already
    assert delta == 10 - ids.numel()  # generation continues after the dense prompt's last position


def test_rewrite_in_one_step_and_across_steps():
    ids, items, channels, dense = _prompt()
    start, _ = prompt_positions(ids.numel(), items)
    whole, delta = rewrite_media_positions(start, ids, [MEDIA], 0, channels)
    assert torch.equal(whole, dense) and delta == 10 - ids.numel()
    flat = torch.cat(channels, dim=1)
    media = (ids == MEDIA).nonzero().flatten()
    for step in range(1, 6):  # every step size: boundaries at every offset around both items
        positions = start
        for begin in range(0, ids.numel(), step):
            rows = ((media >= begin) & (media < begin + step)).nonzero().flatten()
            embeds = [flat[:, rows]] if rows.numel() else []
            positions, _ = rewrite_media_positions(positions, ids, [MEDIA], begin, embeds)
        assert torch.equal(positions, dense), step


def test_rewrite_twice_or_never():
    """A step rewritten again (a resumed request) changes nothing; a step whose media came from the
    prefix cache (no embeddings) keeps the text at its dense positions."""
    ids, items, channels, dense = _prompt()
    start, _ = prompt_positions(ids.numel(), items)
    once, _ = rewrite_media_positions(start, ids, [MEDIA], 0, channels)
    twice, _ = rewrite_media_positions(once, ids, [MEDIA], 0, channels)
    assert torch.equal(twice, dense)
    cached, delta = rewrite_media_positions(start, ids, [MEDIA], 11, [])
    assert torch.equal(cached[:, 11:], dense[:, 11:]) and delta == 10 - ids.numel()


def test_one_dimensional_items():
    """LLaVA-OneVision: 1-D runs as equal rows; a video of 9 dense tokens keeping [0, 3, 7] and its
    newline (offset 8, final before the encoder), then text."""
    ids = torch.tensor([1] + [MEDIA] * 4 + [1])
    rows = torch.tensor([0, 1, 2, 8]).expand(3, -1)
    start, delta = prompt_positions(ids.numel(), [(1, rows, 9)])
    assert start[0, -1] == 10 and start[0, 4] == 9 and delta == 11 - ids.numel()
    original = torch.tensor([0, 3, 7, 8])
    channels = [torch.stack([original, original, original, torch.arange(4)])]
    positions, _ = rewrite_media_positions(start, ids, [MEDIA], 0, channels)
    assert positions[0].tolist() == [0, 1, 4, 8, 9, 10] and torch.equal(positions[0], positions[2])


def test_channels_are_exact_in_low_precision():
    values = torch.tensor([[0, 1, 255, 256], [4095, 12345, 65535, 7]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        channels = encode_positions(values, torch.zeros(1, dtype=dtype))
        assert channels.dtype == dtype and torch.equal(decode_positions(channels), values.T)
