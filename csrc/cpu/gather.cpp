// Per-sample row gather (tokenreduce/ops/compact.py take_rows and compact_kv): whole rows copied with
// memcpy instead of torch.gather's per-element index reads; every layer's keys and values in one call.
#include <ATen/Parallel.h>

#include <cstring>

#include "../checks.h"
#include "../ops.h"
#include "ops_alloc.h"

namespace tokenreduce {

at::Tensor gather_rows_cpu(const at::Tensor& t, const at::Tensor& index) {
  const char* op = "gather_rows";
  check_gather_args(t, index, op);
  const int64_t planes = t.size(0), bt = t.size(1), heads = t.size(2), length = t.size(3), width = t.size(4);
  const int64_t bsz = index.size(0), out_len = index.size(1);
  auto ix = index.contiguous();
  const int64_t* ip = ix.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < bsz * out_len; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < length, op, ": index[", i / out_len, ", ", i % out_len, "] = ", ip[i],
                " is out of range [0, ", length, ")");
  }
  auto src = rows_view(t);
  auto out = at::empty({planes, bsz, heads, out_len, width}, t.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t item = t.element_size(), bytes = width * item;
  const char* sp = static_cast<const char*>(src.const_data_ptr());
  char* dp = static_cast<char*>(out.data_ptr());
  const int64_t s0 = src.stride(0), s1 = bt == 1 ? 0 : src.stride(1), s2 = src.stride(2), s3 = src.stride(3);
  const int64_t total = planes * bsz * heads * out_len;
  at::parallel_for(0, total, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const int64_t j = o % out_len, m = (o / out_len) % heads, b = (o / (out_len * heads)) % bsz;
      const int64_t p = o / (out_len * heads * bsz);
      const int64_t row = ip[b * out_len + j];
      std::memcpy(dp + o * bytes, sp + (p * s0 + b * s1 + m * s2 + row * s3) * item, bytes);
    }
  });
  return out;
}

std::vector<at::Tensor> kv_compact_cpu(at::TensorList tensors, const at::Tensor& index) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    check_dim(t, 4, "kv_compact", "every tensor", "[B, H, L, d]");
    out.push_back(gather_rows_cpu(t.unsqueeze(0), index).squeeze(0));
  }
  return out;
}

}  // namespace tokenreduce
