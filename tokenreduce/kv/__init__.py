"""Cache-stage methods: KV-cache compression, retrieval and cross-prompt sharing for text LLMs.

They plug into transformers through its own extension points: a cache layer (:class:`KVLayer`, a
``DynamicLayer`` that keeps a logical length apart from what it stores) and a registered attention
function that applies each method's mask or partial attention. Methods live in ``kv/methods/``.
"""

from .store import KVStore

__all__ = ["KVStore"]
