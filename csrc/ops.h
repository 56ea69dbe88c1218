// Declarations of the tokenreduce operators. Each has a torch reference in tokenreduce/ops/ that
// defines its semantics exactly; the schemas are in torch_bindings.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace tokenreduce {

// ---- CPU implementations (csrc/cpu/) ----
std::tuple<at::Tensor, at::Tensor> adjacent_similarity_cpu(const at::Tensor& hidden, const at::Tensor& pred,
                                                           const c10::optional<at::Tensor>& candidate,
                                                           double threshold);
at::Tensor fold_runs_cpu(const at::Tensor& pred, const at::Tensor& merge, int64_t steps);
std::tuple<at::Tensor, at::Tensor> merge_compact_cpu(const at::Tensor& hidden, const at::Tensor& size,
                                                     const at::Tensor& dest, const at::Tensor& index);
at::Tensor qk_importance_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& q_index,
                             const at::Tensor& key_valid, double scaling);
at::Tensor gather_rows_cpu(const at::Tensor& t, const at::Tensor& index);
std::vector<at::Tensor> kv_compact_cpu(at::TensorList tensors, const at::Tensor& index);
at::Tensor lsh_signatures_cpu(const at::Tensor& x, const at::Tensor& planes);
std::tuple<at::Tensor, at::Tensor> hamming_top1_cpu(const at::Tensor& query, const at::Tensor& store);

// ---- CUDA implementations (csrc/cuda/) ----
std::tuple<at::Tensor, at::Tensor> adjacent_similarity_cuda(const at::Tensor& hidden, const at::Tensor& pred,
                                                            const c10::optional<at::Tensor>& candidate,
                                                            double threshold);
at::Tensor fold_runs_cuda(const at::Tensor& pred, const at::Tensor& merge, int64_t steps);
std::tuple<at::Tensor, at::Tensor> merge_compact_cuda(const at::Tensor& hidden, const at::Tensor& size,
                                                      const at::Tensor& dest, const at::Tensor& index);
at::Tensor qk_importance_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& q_index,
                              const at::Tensor& key_valid, double scaling);
at::Tensor gather_rows_cuda(const at::Tensor& t, const at::Tensor& index);
std::vector<at::Tensor> kv_compact_cuda(at::TensorList tensors, const at::Tensor& index);
at::Tensor lsh_signatures_cuda(const at::Tensor& x, const at::Tensor& planes);
std::tuple<at::Tensor, at::Tensor> hamming_top1_cuda(const at::Tensor& query, const at::Tensor& store);

}  // namespace tokenreduce
