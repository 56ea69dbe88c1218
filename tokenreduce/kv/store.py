"""KVStore: a bounded, thread-safe store of earlier prompts' token signatures and KV cache, by namespace.

SemShareKV (``tokenreduce.patch(model, "semshare", store=store)``, each request inside
``with tokenreduce.namespace(tenant):``) looks up the most similar stored prompt of the request's
namespace and model, reuses its KV and adds each new prompt. Entries of one namespace are never returned
for another, so tenants of a server never see each other's content; entries of one model (its weight
fingerprint, :mod:`tokenreduce.kv.fingerprint`) are never returned for another.
The store never holds more than ``max_bytes`` (signatures included): adding evicts the least recently
used (or oldest, ``eviction="fifo"``) entries first, and an entry larger than the bound is not stored.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import torch

from ..ops.lsh import hamming_top1, lsh_planes, lsh_signatures

EVICTIONS = ("lru", "fifo")


def check_device(device: str | torch.device) -> None:
    """ValueError unless ``device`` names a device that can hold tensors here (not ``meta``, which holds none)."""
    hint = "use e.g. 'cpu', 'cuda' or 'cuda:1', or None to keep entries where the model computed them"
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"KVStore device {device!r} is not a torch device; {hint}") from None
    if where.type == "meta":
        raise ValueError(f"KVStore device {device!r} holds no data, so nothing could be reused; {hint}")
    try:
        torch.empty(1, device=where)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"KVStore device {device!r} is not usable on this machine ({err}); {hint}") from None


@dataclass(eq=False)
class Entry:
    """One stored prompt: LSH signatures ``[L, W]`` and each layer's keys/values ``[Hkv, L, d]``."""

    namespace: str
    model: str
    signatures: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    nbytes: int = 0
    used: int = 0
    added: int = 0

    @property
    def length(self) -> int:
        return self.signatures.shape[0]


@dataclass
class Match:
    """The best stored prompt for a new one: per new token the matched stored token and Hamming distance."""

    entry: Entry
    index: torch.Tensor
    distance: torch.Tensor
    matched: torch.Tensor  # [L] bool: distance within the threshold

    @property
    def rate(self) -> float:
        return float(self.matched.float().mean())


@dataclass
class KVStore:
    """Earlier prompts for KV reuse, bounded by ``max_bytes``; share one object across requests and threads.

    ``bits`` random hyperplanes (seeded by ``seed``) sign-hash token embeddings; ``device`` is where
    stored tensors live (None: where the model computed them; checked on construction)."""

    max_bytes: int = 512 * 2**20
    eviction: str = "lru"
    bits: int = 128
    seed: int = 0
    device: str | torch.device | None = None
    _entries: list[Entry] = field(default_factory=list, init=False, repr=False)
    _bytes: int = field(default=0, init=False, repr=False)
    _clock: itertools.count = field(default_factory=itertools.count, init=False, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, init=False, repr=False)
    _planes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        if self.eviction not in EVICTIONS:
            raise ValueError(f"eviction must be one of {EVICTIONS}, got {self.eviction!r}")
        if not isinstance(self.bits, int) or not 8 <= self.bits <= 4096:
            raise ValueError(f"bits must be an integer in [8, 4096], got {self.bits!r}")
        if self.device is not None:
            check_device(self.device)

    # signatures ---------------------------------------------------------------------------
    def signatures(self, x: torch.Tensor) -> torch.Tensor:
        """LSH signatures ``[..., W]`` of vectors ``x`` ``[..., dim]`` with this store's hyperplanes."""
        key = (x.shape[-1], str(x.device))
        with self._lock:
            planes = self._planes.get(key)
            if planes is None:
                planes = self._planes[key] = lsh_planes(x.shape[-1], self.bits, self.seed, x.device)
        return lsh_signatures(x, planes)

    # reading ----------------------------------------------------------------------------------
    def best(self, namespace: str, model: str, signatures: torch.Tensor, max_distance: int) -> Match | None:
        """The stored prompt of ``namespace`` (and the same ``model``) with the most tokens within
        ``max_distance`` bits of a new token's signature; None if the namespace has none."""
        with self._lock:
            candidates = [e for e in self._entries if e.namespace == namespace and e.model == model]
            best: Match | None = None
            best_rank = (0, 0)
            for entry in candidates:
                index, distance = hamming_top1(signatures, entry.signatures.to(signatures.device))
                match = Match(entry, index, distance, distance <= max_distance)
                rank = (int(match.matched.sum()), -int(distance.sum()))
                if best is None or rank > best_rank:
                    best, best_rank = match, rank
            if best is not None:
                best.entry.used = next(self._clock)
            return best

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def bytes_used(self) -> int:
        """Bytes held by stored signatures, keys and values (never above ``max_bytes``)."""
        with self._lock:
            return self._bytes

    def namespaces(self) -> dict[str, int]:
        """Entries per namespace."""
        with self._lock:
            out: dict[str, int] = {}
            for e in self._entries:
                out[e.namespace] = out.get(e.namespace, 0) + 1
            return out

    # writing ----------------------------------------------------------------------------------
    def add(self, namespace: str, model: str, signatures: torch.Tensor, keys: list[torch.Tensor],
            values: list[torch.Tensor]) -> bool:
        """Store a prompt (copies of the tensors); False if it alone is larger than ``max_bytes``."""
        if not isinstance(namespace, str) or not namespace:
            raise ValueError(f"namespace must be a non-empty string, got {namespace!r}")
        tensors = [signatures, *keys, *values]
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        if nbytes > self.max_bytes:
            return False
        device = self.device
        copy = [t.detach().to(device, copy=True) if device else t.detach().clone() for t in tensors]
        n = len(keys)
        with self._lock:
            while self._entries and self._bytes + nbytes > self.max_bytes:
                victim = min(self._entries, key=(lambda e: e.used) if self.eviction == "lru" else (lambda e: e.added))
                self._entries.remove(victim)
                self._bytes -= victim.nbytes
            tick = next(self._clock)
            self._entries.append(Entry(namespace, model, copy[0], copy[1:1 + n], copy[1 + n:], nbytes, tick, tick))
            self._bytes += nbytes
        return True

    def clear(self, namespace: str | None = None) -> None:
        """Drop every entry (of ``namespace`` only, if given)."""
        with self._lock:
            keep = [e for e in self._entries if namespace is not None and e.namespace != namespace]
            self._entries[:] = keep
            self._bytes = sum(e.nbytes for e in keep)
