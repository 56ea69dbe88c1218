// Query-key importance (tokenreduce/ops/importance.py): the softmax of a few query rows against all keys,
// averaged over heads and queries. Grouped-query heads share a key head: each key row is read once and
// scored against all g * n queries of its group, never repeated. Only one [g * n, Lk] block of logits
// exists per task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "ops_alloc.h"
#include "vec.h"

namespace tokenreduce {

at::Tensor qk_importance_cpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& q_index,
                             const at::Tensor& key_valid, double scaling) {
  const char* op = "qk_importance";
  check_importance_args(query, key, q_index, key_valid, op);
  const int64_t bsz = query.size(0), hq = query.size(1), lq = query.size(2), dim = query.size(3);
  const int64_t hkv = key.size(1), lk = key.size(2), n = q_index.size(1), group = hq / hkv, rows = group * n;
  auto qi = q_index.contiguous();
  auto kv = key_valid.contiguous();
  auto q = rows_view(query);
  auto k = rows_view(key);
  const int64_t* qip = qi.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < bsz * n; ++i) {
    TORCH_CHECK(qip[i] >= 0 && qip[i] < lq, op, ": q_index[", i / n, ", ", i % n, "] = ", qip[i],
                " is out of range [0, ", lq, ")");
  }
  const bool* kvp = kv.const_data_ptr<bool>();
  auto partial = at::zeros({bsz, hkv, lk}, query.options().dtype(at::kFloat));
  float* pp = partial.data_ptr<float>();
  const float scale = static_cast<float>(scaling);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_importance_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    at::parallel_for(0, bsz * hkv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(rows * dim), kf(dim), logits(rows * lk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / hkv, h = task % hkv;
        const int64_t* qrow = qip + b * n;
        for (int64_t gi = 0; gi < group; ++gi) {  // rows in (g, n) order: query head h * group + gi
          for (int64_t t = 0; t < n; ++t) {
            const scalar_t* src = qp + b * q.stride(0) + (h * group + gi) * q.stride(1) + qrow[t] * q.stride(2);
            for (int64_t c = 0; c < dim; ++c) qf[(gi * n + t) * dim + c] = static_cast<float>(src[c]);
          }
        }
        for (int64_t j = 0; j < lk; ++j) {
          const scalar_t* src = kp + b * k.stride(0) + h * k.stride(1) + j * k.stride(2);
          for (int64_t c = 0; c < dim; ++c) kf[c] = static_cast<float>(src[c]);
          const bool valid = kvp[b * lk + j];
          for (int64_t r = 0; r < rows; ++r) {
            const bool allowed = valid && j <= qrow[r % n];  // causal: a query never sees a later key
            logits[r * lk + j] = allowed ? dot_lanes(qf.data() + r * dim, kf.data(), dim) * scale : neg_inf;
          }
        }
        float* acc = pp + (b * hkv + h) * lk;
        for (int64_t r = 0; r < rows; ++r) {
          float* l = logits.data() + r * lk;
          float top = neg_inf;
          for (int64_t j = 0; j < lk; ++j) top = std::max(top, l[j]);
          if (top == neg_inf) continue;  // no visible key: the reference's NaN row, zeroed
          double total = 0;
          for (int64_t j = 0; j < lk; ++j) {
            l[j] = std::exp(l[j] - top);
            total += l[j];
          }
          const float inv = static_cast<float>(1.0 / total);
          for (int64_t j = 0; j < lk; ++j) acc[j] += l[j] * inv;
        }
      }
    });
  });
  return partial.sum(1).div_(static_cast<double>(hq * n));
}

}  // namespace tokenreduce
