// Size-weighted merge fused with compaction (tokenreduce/ops/merge.py weighted_merge followed by
// tokenreduce/ops/compact.py take_rows): only the rows that survive are accumulated and written, straight
// into the compacted output, reading the hidden states once. The arithmetic is the reference's, in the
// same order (float32 products h * size summed in row order, then one division), so results are equal.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../ops.h"
#include "ops_alloc.h"

namespace tokenreduce {

std::tuple<at::Tensor, at::Tensor> merge_compact_cpu(const at::Tensor& hidden, const at::Tensor& size,
                                                     const at::Tensor& dest, const at::Tensor& index) {
  const char* op = "merge_compact";
  check_merge_args(hidden, size, dest, index, op);
  const int64_t bsz = hidden.size(0), length = hidden.size(1), dim = hidden.size(2), out_len = index.size(1);
  auto h = rows_view(hidden);
  auto sz = size.contiguous();
  auto ds = dest.contiguous();
  auto ix = index.contiguous();
  const float* szp = sz.const_data_ptr<float>();
  const int64_t* dp = ds.const_data_ptr<int64_t>();
  const int64_t* ip = ix.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < bsz * length; ++i) {
    TORCH_CHECK(dp[i] >= 0 && dp[i] < length, op, ": dest[", i / length, ", ", i % length, "] = ", dp[i],
                " is out of range [0, ", length, ")");
  }
  for (int64_t i = 0; i < bsz * out_len; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < length, op, ": index[", i / out_len, ", ", i % out_len, "] = ", ip[i],
                " is out of range [0, ", length, ")");
  }
  // per sample: new sizes, and the first output slot of each source row (-1: not in the output)
  std::vector<float> new_size(bsz * length, 0.f);
  std::vector<int64_t> slot(bsz * length, -1);
  auto out_size = at::empty({bsz, out_len}, size.options());
  float* osp = out_size.data_ptr<float>();
  for (int64_t b = 0; b < bsz; ++b) {
    float* ns = new_size.data() + b * length;
    int64_t* sl = slot.data() + b * length;
    for (int64_t i = 0; i < length; ++i) ns[dp[b * length + i]] += szp[b * length + i];
    for (int64_t j = out_len - 1; j >= 0; --j) sl[ip[b * out_len + j]] = j;
    for (int64_t j = 0; j < out_len; ++j) {
      const int64_t r = ip[b * out_len + j];
      osp[b * out_len + j] = ns[r] > 0 ? ns[r] : szp[b * length + r];
    }
  }
  auto out = at::empty({bsz, out_len, dim}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
  constexpr int64_t kCols = 256;
  const int64_t blocks = (dim + kCols - 1) / kCols;
  const int64_t sb = h.stride(0), srow = h.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "merge_compact_cpu", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* outp = out.data_ptr<scalar_t>();
    at::parallel_for(0, bsz * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> acc;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / blocks, c0 = (task % blocks) * kCols, cols = std::min(kCols, dim - c0);
        const float* ns = new_size.data() + b * length;
        const int64_t* sl = slot.data() + b * length;
        const int64_t* drow = dp + b * length;
        const float* srow_size = szp + b * length;
        acc.assign(out_len * cols, 0.f);
        for (int64_t i = 0; i < length; ++i) {
          const int64_t r = drow[i], s = sl[r];
          if (s < 0 || !(ns[r] > 0)) continue;
          const float w = srow_size[i];
          const scalar_t* x = hp + b * sb + i * srow + c0;
          float* a = acc.data() + s * cols;
          for (int64_t c = 0; c < cols; ++c) {
            const float prod = static_cast<float>(x[c]) * w;
            a[c] += prod;
          }
        }
        for (int64_t j = 0; j < out_len; ++j) {
          const int64_t r = ip[b * out_len + j], s = sl[r];
          scalar_t* y = outp + (b * out_len + j) * dim + c0;
          if (s != j) {  // a second slot of the same row (padding slots all read row 0)
            const scalar_t* first = outp + (b * out_len + s) * dim + c0;
            std::copy(first, first + cols, y);
          } else if (ns[r] > 0) {
            const float denom = std::max(ns[r], 1e-6f);
            const float* a = acc.data() + s * cols;
            for (int64_t c = 0; c < cols; ++c) y[c] = static_cast<scalar_t>(a[c] / denom);
          } else {  // a row nothing folds into keeps its value (through float32, as the reference)
            const scalar_t* x = hp + b * sb + r * srow + c0;
            for (int64_t c = 0; c < cols; ++c) y[c] = static_cast<scalar_t>(static_cast<float>(x[c]));
          }
        }
      }
    });
  });
  return {out, out_size};
}

}  // namespace tokenreduce
