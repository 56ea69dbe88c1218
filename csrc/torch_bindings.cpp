// Operator schemas of the torch.ops.tokenreduce namespace and their CPU implementations.
// The CUDA implementations register under the same names from the separate CUDA extension
// (csrc/cuda/bindings.cpp), loaded after this one.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(tokenreduce, m) {
  // cosine of each row with its predecessor row (-inf without one) and the threshold test
  m.def("adjacent_similarity(Tensor hidden, Tensor pred, Tensor? candidate, float threshold) -> (Tensor, Tensor)");
  // destination of each row: itself, or the head of its run of merged rows
  m.def("fold_runs(Tensor pred, Tensor merge, int steps) -> Tensor");
  // size-weighted merge into run heads, fused with the gather of the kept rows
  m.def("merge_compact(Tensor hidden, Tensor size, Tensor dest, Tensor index) -> (Tensor, Tensor)");
  // attention a few query rows pay each key, averaged over heads and queries (GQA-aware)
  m.def("qk_importance(Tensor query, Tensor key, Tensor q_index, Tensor key_valid, float scaling) -> Tensor");
  // per-sample row gather of a [P, Bt, M, L, T] tensor
  m.def("gather_rows(Tensor t, Tensor index) -> Tensor");
  // the same gather for every layer's keys and values [B, H, L, d]
  m.def("kv_compact(Tensor[] tensors, Tensor index) -> Tensor[]");
  // random-hyperplane sign bits packed into int64 words
  m.def("lsh_signatures(Tensor x, Tensor planes) -> Tensor");
  // nearest stored signature by Hamming distance (lowest index on ties)
  m.def("hamming_top1(Tensor query, Tensor store) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokenreduce, CPU, m) {
  m.impl("adjacent_similarity", &tokenreduce::adjacent_similarity_cpu);
  m.impl("fold_runs", &tokenreduce::fold_runs_cpu);
  m.impl("merge_compact", &tokenreduce::merge_compact_cpu);
  m.impl("qk_importance", &tokenreduce::qk_importance_cpu);
  m.impl("gather_rows", &tokenreduce::gather_rows_cpu);
  m.impl("kv_compact", &tokenreduce::kv_compact_cpu);
  m.impl("lsh_signatures", &tokenreduce::lsh_signatures_cpu);
  m.impl("hamming_top1", &tokenreduce::hamming_top1_cpu);
}
