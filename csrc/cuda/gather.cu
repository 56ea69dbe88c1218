// Per-sample row gather: one warp per output row, 16-byte copies when rows are aligned, element copies
// otherwise; every layer's keys and values in one call.
#include "../checks.h"
#include "../ops.h"
#include "common.cuh"

#include <ATen/ops/empty.h>

namespace tokenreduce {
namespace {

constexpr int kRowsPerBlock = 8;

// copies rows of `width` units of type U (a 16-byte Pack or an element-sized integer)
template <typename U>
__global__ void gather_rows_kernel(const U* __restrict__ src, const int64_t* __restrict__ index,
                                   U* __restrict__ out, int64_t total, int64_t bsz, int64_t heads, int64_t out_len,
                                   int64_t length, int64_t width, int64_t s0, int64_t s1, int64_t s2, int64_t s3) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (o >= total) return;
  const int64_t j = o % out_len, m = (o / out_len) % heads, b = (o / (out_len * heads)) % bsz;
  const int64_t p = o / (out_len * heads * bsz);
  const int64_t row = index[b * out_len + j];
  CUDA_KERNEL_ASSERT(row >= 0 && row < length);
  const U* from = src + p * s0 + b * s1 + m * s2 + row * s3;
  U* to = out + o * width;
  for (int64_t c = threadIdx.x % kWarp; c < width; c += kWarp) to[c] = from[c];
}

template <typename U>
void launch(const at::Tensor& src, const at::Tensor& index, at::Tensor& out, int64_t scale) {
  const int64_t planes = src.size(0), bt = src.size(1), heads = src.size(2), length = src.size(3);
  const int64_t bsz = index.size(0), out_len = index.size(1);
  const int64_t total = planes * bsz * heads * out_len;
  const int64_t width = src.size(4) / scale;
  gather_rows_kernel<U><<<blocks_for(total, kRowsPerBlock), kRowsPerBlock * kWarp, 0,
                          c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const U*>(src.const_data_ptr()), index.const_data_ptr<int64_t>(), static_cast<U*>(out.data_ptr()),
      total, bsz, heads, out_len, length, width, src.stride(0) / scale, bt == 1 ? 0 : src.stride(1) / scale,
      src.stride(2) / scale, src.stride(3) / scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor gather_rows_cuda(const at::Tensor& t, const at::Tensor& index) {
  const char* op = "gather_rows";
  check_gather_args(t, index, op);
  const c10::cuda::CUDAGuard guard(t.device());
  auto src = rows_view(t);
  auto ix = index.contiguous();
  auto out = at::empty({t.size(0), index.size(0), t.size(2), index.size(1), t.size(4)},
                       t.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t item = t.element_size();
  const int64_t per_pack = 16 / item;
  bool packed = 16 % item == 0 && reinterpret_cast<uintptr_t>(src.const_data_ptr()) % 16 == 0;
  for (int d = 0; d < 5 && packed; ++d) packed = d == 4 ? src.size(4) % per_pack == 0 : src.stride(d) % per_pack == 0;
  if (packed) {
    launch<uint4>(src, ix, out, per_pack);
  } else if (item == 8) {
    launch<uint64_t>(src, ix, out, 1);
  } else if (item == 4) {
    launch<uint32_t>(src, ix, out, 1);
  } else if (item == 2) {
    launch<uint16_t>(src, ix, out, 1);
  } else {
    TORCH_CHECK(item == 1, op, ": unsupported element size ", item);
    launch<uint8_t>(src, ix, out, 1);
  }
  return out;
}

std::vector<at::Tensor> kv_compact_cuda(at::TensorList tensors, const at::Tensor& index) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) {
    check_dim(t, 4, "kv_compact", "every tensor", "[B, H, L, d]");
    out.push_back(gather_rows_cuda(t.unsqueeze(0), index).squeeze(0));
  }
  return out;
}

}  // namespace tokenreduce
