// CUDA implementations of the torch.ops.tokenreduce operators (schemas in ../torch_bindings.cpp).
#include <torch/library.h>

#include "../ops.h"

TORCH_LIBRARY_IMPL(tokenreduce, CUDA, m) {
  m.impl("adjacent_similarity", &tokenreduce::adjacent_similarity_cuda);
  m.impl("fold_runs", &tokenreduce::fold_runs_cuda);
  m.impl("merge_compact", &tokenreduce::merge_compact_cuda);
  m.impl("qk_importance", &tokenreduce::qk_importance_cuda);
  m.impl("gather_rows", &tokenreduce::gather_rows_cuda);
  m.impl("kv_compact", &tokenreduce::kv_compact_cuda);
  m.impl("lsh_signatures", &tokenreduce::lsh_signatures_cuda);
  m.impl("hamming_top1", &tokenreduce::hamming_top1_cuda);
}
