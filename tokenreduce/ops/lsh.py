"""Random-hyperplane LSH: sign bits packed into 64-bit words, and Hamming top-1 matching.

SimHash (Charikar, STOC 2002): the sign of a vector's projection on ``bits`` random hyperplanes is a
signature whose Hamming distance to another's estimates the angle between the two vectors
(``P[bit differs] = angle / pi``). SemShareKV uses it to find, for each token of a new prompt, the
most similar token of a stored one. These are the torch references; compiled versions live in
``csrc/`` and are registered as ``torch.ops.tokenreduce.*``.
"""

from __future__ import annotations

import torch

from .. import kernels

WORD = 64


def lsh_planes(dim: int, bits: int, seed: int = 0, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[dim, bits]`` Gaussian random hyperplane normals from a seeded CPU ``torch.Generator``.

    Drawn on the CPU so the same seed gives the same planes on every device."""
    if dim < 1 or bits < 1:
        raise ValueError(f"lsh_planes needs dim >= 1 and bits >= 1, got dim={dim}, bits={bits}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    planes = torch.randn(dim, bits, generator=gen, dtype=torch.float32)
    return planes.to(device=device, dtype=dtype)


def _check_signature_args(x: torch.Tensor, planes: torch.Tensor) -> None:
    if planes.ndim != 2:
        raise ValueError(f"planes must be [dim, bits], got shape {tuple(planes.shape)}")
    if x.ndim < 1 or x.shape[-1] != planes.shape[0]:
        raise ValueError(f"x's last dimension must equal planes' dim {planes.shape[0]}, got x {tuple(x.shape)}")
    if not (x.is_floating_point() and planes.is_floating_point()):
        raise ValueError(f"x and planes must be floating point, got {x.dtype} and {planes.dtype}")


def lsh_signatures(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """int64 ``[..., ceil(bits / 64)]`` sign bits of ``x`` ``[..., dim]`` projected on ``planes`` ``[dim, bits]``.

    Bit ``i`` of word ``w`` is set when the projection on plane ``64 * w + i`` is positive (> 0, so
    a zero vector has no bits set); the bits past ``bits`` in the last word are zero. Projections are
    computed in float32 whatever the input dtype (the kernel's may differ only for projections within
    float32 rounding of zero).
    """
    _check_signature_args(x, planes)
    if kernels.use("lsh_signatures", x, planes):
        out = torch.ops.tokenreduce.lsh_signatures(x.reshape(-1, x.shape[-1]), planes)
        return out.view(*x.shape[:-1], out.shape[-1])
    return lsh_signatures_reference(x, planes)


def lsh_signatures_reference(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Torch reference of :func:`lsh_signatures`."""
    _check_signature_args(x, planes)
    bits = planes.shape[1]
    words = -(-bits // WORD)
    proj = x.reshape(-1, x.shape[-1]).float() @ planes.float()  # [N, bits]
    positive = torch.zeros(proj.shape[0], words * WORD, dtype=torch.bool, device=x.device)
    positive[:, :bits] = proj > 0
    weights = torch.ones(WORD, dtype=torch.int64, device=x.device) << torch.arange(WORD, device=x.device)
    packed = (positive.view(-1, words, WORD).long() * weights).sum(dim=-1)  # distinct powers of 2: sum == or
    return packed.view(*x.shape[:-1], words)


def _popcount(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 (SWAR bit counting; the masks drop arithmetic-shift sign bits)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return (x * 0x0101010101010101) >> 56  # wraps modulo 2**64; the top byte holds the count (<= 64)


def hamming_top1(query: torch.Tensor, store: torch.Tensor, chunk: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each signature in ``query`` ``[Q, W]`` the nearest of ``store`` ``[S, W]`` (int64 words).

    Returns ``(index [Q], distance [Q])`` int64: the smallest Hamming distance, the lowest store
    index on ties. An empty store gives index -1 and distance ``64 * W`` (farther than any match).
    The reference works on ``chunk`` queries at a time (default: about 2**22 XOR words at once, so a
    few 32 MiB temporaries); the kernel keeps none.
    """
    _check_hamming_args(query, store)
    if kernels.use("hamming_top1", query, store):
        return tuple(torch.ops.tokenreduce.hamming_top1(query, store))
    return hamming_top1_reference(query, store, chunk)


def _check_hamming_args(query: torch.Tensor, store: torch.Tensor) -> None:
    if query.ndim != 2 or store.ndim != 2 or query.shape[1] != store.shape[1]:
        raise ValueError(f"hamming_top1 needs query [Q, W] and store [S, W] with the same W, "
                         f"got {tuple(query.shape)} and {tuple(store.shape)}")
    if query.dtype != torch.int64 or store.dtype != torch.int64:
        raise ValueError(f"signatures must be int64 words (lsh_signatures), got {query.dtype} and {store.dtype}")


def hamming_top1_reference(query: torch.Tensor, store: torch.Tensor, chunk: int | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of :func:`hamming_top1`."""
    _check_hamming_args(query, store)
    n_query, words = query.shape
    if store.shape[0] == 0:
        return (torch.full((n_query,), -1, dtype=torch.int64, device=query.device),
                torch.full((n_query,), WORD * words, dtype=torch.int64, device=query.device))
    rows = torch.arange(len(store), device=query.device)
    chunk = chunk or max(1, (1 << 22) // (store.shape[0] * words))
    index, distance = [], []
    for start in range(0, n_query, chunk):
        x = query[start:start + chunk, None, :] ^ store[None, :, :]  # [q, S, W]
        dist = _popcount(x).sum(dim=-1)
        best = (dist * len(store) + rows).min(dim=1).values  # ties go to the lowest index on every device
        index.append(best % len(store))
        distance.append(best // len(store))
    if not index:
        empty = torch.empty(0, dtype=torch.int64, device=query.device)
        return empty, empty.clone()
    return torch.cat(index), torch.cat(distance)
