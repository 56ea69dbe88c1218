// Adjacent-frame similarity fused with the threshold test, and run detection (tokenreduce/ops/similarity.py,
// tokenreduce/ops/merge.py fold_into_heads): one pass over the hidden states, reading each row and its
// predecessor once, instead of a gather of the whole tensor, a float copy and a cosine.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "../checks.h"
#include "../ops.h"
#include "ops_alloc.h"
#include "vec.h"

namespace tokenreduce {

std::tuple<at::Tensor, at::Tensor> adjacent_similarity_cpu(const at::Tensor& hidden, const at::Tensor& pred,
                                                           const c10::optional<at::Tensor>& candidate,
                                                           double threshold) {
  const char* op = "adjacent_similarity";
  check_dim(hidden, 3, op, "hidden", "[B, L, D]");
  check_float(hidden, op, "hidden");
  const int64_t bsz = hidden.size(0), length = hidden.size(1), dim = hidden.size(2);
  check_pred(pred, bsz, length, op);
  at::Tensor cand;
  if (candidate.has_value()) {
    cand = candidate->contiguous();
    check_dtype(cand, at::kBool, op, "candidate");
    TORCH_CHECK(cand.sizes() == pred.sizes(), op, ": candidate must have pred's shape ", pred.sizes(), ", got ",
                cand.sizes());
  }
  auto h = rows_view(hidden);
  auto p = pred.contiguous();
  auto sim = at::empty({bsz, length}, hidden.options().dtype(at::kFloat));
  auto ok = at::empty({bsz, length}, hidden.options().dtype(at::kBool));
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const bool* cp = cand.defined() ? cand.const_data_ptr<bool>() : nullptr;
  float* sp = sim.data_ptr<float>();
  bool* op_ = ok.data_ptr<bool>();
  const float thr = static_cast<float>(threshold);
  const int64_t sb = h.stride(0), sl = h.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "adjacent_similarity_cpu", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    at::parallel_for(0, bsz * length, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / length, l = i % length, j = pp[i];
        TORCH_CHECK(j < length, op, ": pred[", b, ", ", l, "] = ", j, " is out of range for L = ", length);
        if (j < 0) {
          sp[i] = -std::numeric_limits<float>::infinity();
          op_[i] = false;
          continue;
        }
        const scalar_t* x = hp + b * sb + l * sl;
        const scalar_t* y = hp + b * sb + j * sl;
        // F.cosine_similarity: each norm clamped at eps = 1e-8
        const double nx = std::max(std::sqrt(static_cast<double>(dot_lanes(x, x, dim))), 1e-8);
        const double ny = std::max(std::sqrt(static_cast<double>(dot_lanes(y, y, dim))), 1e-8);
        const float cos = static_cast<float>(dot_lanes(x, y, dim) / (nx * ny));
        sp[i] = cos;
        op_[i] = (cp == nullptr || cp[i]) && cos >= thr;
      }
    });
  });
  return {sim, ok};
}

at::Tensor fold_runs_cpu(const at::Tensor& pred, const at::Tensor& merge, int64_t steps) {
  const char* op = "fold_runs";
  check_dim(pred, 2, op, "pred", "[B, L] int64");
  check_pred(pred, pred.size(0), pred.size(1), op);
  check_dtype(merge, at::kBool, op, "merge");
  TORCH_CHECK(merge.sizes() == pred.sizes(), op, ": merge must have pred's shape ", pred.sizes(), ", got ",
              merge.sizes());
  TORCH_CHECK(steps >= 1, op, ": steps must be >= 1, got ", steps);
  const int64_t bsz = pred.size(0), length = pred.size(1);
  auto p = pred.contiguous();
  auto mg = merge.contiguous();
  const int64_t* pp = p.const_data_ptr<int64_t>();
  const bool* mp = mg.const_data_ptr<bool>();
  for (int64_t i = 0; i < bsz * length; ++i) {  // runs point backwards: a cycle would have no head
    TORCH_CHECK(pp[i] >= -1 && pp[i] < i % length, op, ": pred[", i / length, ", ", i % length, "] = ", pp[i],
                " must be -1 (no predecessor) or an earlier row in [0, ", i % length, ")");
  }
  auto dest = at::empty_like(p);
  int64_t* dp = dest.data_ptr<int64_t>();
  at::parallel_for(0, bsz * length, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t base = (i / length) * length;
      int64_t r = i % length;
      // follow the run up to `steps` links (the reference's pointer doubling), stopping at its head
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t next = (mp[base + r] && pp[base + r] >= 0) ? pp[base + r] : r;
        if (next == r) break;
        r = next;
      }
      dp[i] = r;
    }
  });
  return dest;
}

}  // namespace tokenreduce
