"""Tensor primitives of token reduction. Each has a plain torch reference (``*_reference``); those with a
compiled kernel in ``csrc/`` run it where :mod:`tokenreduce.kernels` enables it, with the same results."""

from .compact import Compaction, compact_kv, compaction_index, take_rows
from .importance import last_query_importance
from .merge import fold_into_heads, merge_compact, weighted_merge
from .select import topk_mask
from .similarity import adjacent_cosine, same_cell_predecessor, similar_predecessors

__all__ = ["Compaction", "adjacent_cosine", "compact_kv", "compaction_index", "fold_into_heads",
           "last_query_importance", "merge_compact", "same_cell_predecessor", "similar_predecessors", "take_rows",
           "topk_mask", "weighted_merge"]
