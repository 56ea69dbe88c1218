"""The plugin's position arithmetic (pure torch, no vLLM: runs in the main suite too): 1-D prompt
positions with reduced media runs, their rewrite from the embeddings' channels, in one prefill step or
split across several, and the exact channel encoding."""

from __future__ import annotations

import torch
from tokenreduce_vllm.positions import decode_positions, encode_positions, rewrite_media_positions, sequence_positions

MEDIA = 9


def _prompt():
    """3 text tokens, a video of 10 dense tokens keeping rows [0, 2, 5, 9], 2 text tokens, an image of 3
    tokens (unreduced), 1 text token."""
    ids = torch.tensor([1, 1, 1] + [MEDIA] * 4 + [1, 1] + [MEDIA] * 3 + [1])
    kept = [torch.tensor([0, 2, 5, 9]), torch.arange(3)]
    dense = [0, 1, 2, 3, 5, 8, 12, 13, 14, 15, 16, 17, 18]
    return ids, kept, torch.tensor(dense)


def _channels(kept: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.stack([k, torch.arange(k.numel()), torch.zeros_like(k), torch.zeros_like(k)]) for k in kept]


def test_prompt_positions_before_and_after_the_encoder():
    ids, kept, dense = _prompt()
    positions, delta = sequence_positions(ids.numel(), [(3, 4, 10), (9, 3, 3)])
    assert positions.shape == (3, ids.numel()) and torch.equal(positions[0], positions[2])
    text = ids != MEDIA
    assert torch.equal(positions[0][text], dense[text])  # text already at its dense positions
    assert delta == 6  # 6 fewer tokens than the dense prompt: generation continues at 19
    rewritten, after = rewrite_media_positions(positions, ids, [MEDIA], 0, _channels(kept))
    assert torch.equal(rewritten[0], dense) and torch.equal(rewritten[1], dense)
    assert after == 6 and int(rewritten.max()) + 1 == ids.numel() + after


def test_rewrite_across_prefill_steps_equals_one_step():
    """Chunked prefill: steps of 5 tokens carry slices of the media embeddings."""
    ids, kept, dense = _prompt()
    positions, _ = sequence_positions(ids.numel(), [(3, 4, 10), (9, 3, 3)])
    channels = torch.cat(_channels(kept), dim=1)
    media = (ids == MEDIA).nonzero().flatten()
    done = 0
    for start in range(0, ids.numel(), 5):
        rows = ((media >= start) & (media < start + 5)).nonzero().flatten()
        step = [channels[:, rows]] if rows.numel() else []
        positions, _ = rewrite_media_positions(positions, ids, [MEDIA], start, step)
        done += rows.numel()
    assert done == media.numel() and torch.equal(positions[0], dense)


def test_channels_are_exact_in_low_precision():
    values = torch.tensor([[0, 1, 255, 256], [4095, 12345, 65535, 7]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        channels = encode_positions(values, torch.zeros(1, dtype=dtype))
        assert channels.dtype == dtype and torch.equal(decode_positions(channels), values.T)
