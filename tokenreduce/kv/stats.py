"""What the KV engine did: entries kept per layer, bytes held, reuse, time spent in the methods' own work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class KVStats:
    """The cache after the last forward of a patched model (``tokenreduce.stats(model)``).

    ``layer_entries`` are the KV entries each layer holds (fullest sample and head), ``logical_length``
    the tokens the dense cache would hold, ``kv_bytes``/``dense_kv_bytes`` the bytes held and the bytes
    a dense cache of the same length would hold; ``computed_rows`` the prompt rows each layer ran
    (semshare, semtoken), ``reuse_rate`` the fraction of (token, layer) KV entries taken from the store
    (semshare), ``method_ms`` host time spent in the method's own work for prefill and decoding."""

    method: str
    logical_length: int = 0
    layer_entries: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    dense_kv_bytes: int = 0
    computed_rows: list[int] | None = None
    reuse_rate: float | None = None
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    decode_steps: int = 0
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        if not self.layer_entries or not self.logical_length:
            return 1.0
        return sum(self.layer_entries) / (len(self.layer_entries) * self.logical_length)

    def summary(self) -> str:
        lines = [f"{self.method}: {self.logical_length} tokens in the cache's logical length",
                 f"  KV entries per layer: {self.layer_entries} ({self.kept_fraction:.1%} of dense)",
                 f"  KV bytes held: {self.kv_bytes:,} (dense: {self.dense_kv_bytes:,})"]
        if self.computed_rows is not None:
            lines.append(f"  prompt rows computed per layer: {self.computed_rows}")
        if self.reuse_rate is not None:
            lines.append(f"  reuse rate: {self.reuse_rate:.1%} of (token, layer) KV entries from the store")
        lines.append(f"  method time: prefill {self.prefill_ms:.2f} ms, decode {self.decode_ms:.2f} ms "
                     f"over {self.decode_steps} steps")
        lines += [f"  {k}: {v}" for k, v in self.notes.items()]
        return "\n".join(lines)
