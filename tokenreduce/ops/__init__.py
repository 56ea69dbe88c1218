"""Tensor primitives of token reduction, each a plain torch reference implementation."""

from .compact import Compaction, compaction_index, take_rows
from .importance import last_query_importance
from .merge import fold_into_heads, weighted_merge
from .select import topk_mask
from .similarity import adjacent_cosine, same_cell_predecessor

__all__ = ["Compaction", "adjacent_cosine", "compaction_index", "fold_into_heads", "last_query_importance",
           "same_cell_predecessor", "take_rows", "topk_mask", "weighted_merge"]
