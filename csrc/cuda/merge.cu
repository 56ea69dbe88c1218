// Size-weighted merge fused with compaction: one block per output row sums, in row order, the rows that
// fold into its source row (members listed by a stable sort of `dest`, so the order and the float32
// arithmetic are the CPU kernel's and the reference's: products h * size, summed, then one division;
// _rn intrinsics keep nvcc from contracting them into FMAs), and writes the result straight into the
// compacted output. Rows nothing folds into are copied.
#include "../checks.h"
#include "../ops.h"
#include "common.cuh"

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

namespace tokenreduce {
namespace {

template <typename T>
__global__ void merge_compact_kernel(const T* __restrict__ hidden, const float* __restrict__ size,
                                     const float* __restrict__ new_size, const int64_t* __restrict__ members,
                                     const int64_t* __restrict__ start, const int64_t* __restrict__ stop,
                                     const int64_t* __restrict__ index, T* __restrict__ out, int64_t length,
                                     int64_t out_len, int64_t dim, int64_t stride_b, int64_t stride_l) {
  const int64_t o = blockIdx.x;  // output row (b, j)
  const int64_t b = o / out_len;
  const int64_t r = index[o];
  CUDA_KERNEL_ASSERT(r >= 0 && r < length);
  const T* base = hidden + b * stride_b;
  T* y = out + o * dim;
  const float ns = new_size[b * length + r];
  const int64_t first = start[b * length + r], last = stop[b * length + r];
  for (int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; c < dim;
       c += static_cast<int64_t>(gridDim.y) * blockDim.x) {
    if (ns > 0.f) {
      float acc = 0.f;
      for (int64_t m = first; m < last; ++m) {
        const int64_t i = members[b * length + m];
        acc = __fadd_rn(acc, __fmul_rn(static_cast<float>(base[i * stride_l + c]), size[b * length + i]));
      }
      y[c] = static_cast<T>(__fdiv_rn(acc, fmaxf(ns, 1e-6f)));
    } else {
      y[c] = static_cast<T>(static_cast<float>(base[r * stride_l + c]));
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> merge_compact_cuda(const at::Tensor& hidden, const at::Tensor& size,
                                                      const at::Tensor& dest, const at::Tensor& index) {
  const char* op = "merge_compact";
  check_merge_args(hidden, size, dest, index, op);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t bsz = hidden.size(0), length = hidden.size(1), dim = hidden.size(2), out_len = index.size(1);
  auto h = rows_view(hidden);
  auto sz = size.contiguous();
  auto ds = dest.contiguous();
  auto ix = index.contiguous();
  // all asynchronous ATen ops: new sizes, and each row's members as a range of a stable sort by dest
  auto new_size = at::zeros({bsz, length}, sz.options()).scatter_add_(1, ds, sz);
  auto sorted = at::sort(ds, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  const auto& keys = std::get<0>(sorted);
  auto members = std::get<1>(sorted).contiguous();
  auto rows = at::arange(length, ds.options()).expand({bsz, length}).contiguous();
  auto start = at::searchsorted(keys, rows, /*out_int32=*/false, /*right=*/false).contiguous();
  auto stop = at::searchsorted(keys, rows, /*out_int32=*/false, /*right=*/true).contiguous();
  auto out_size = at::where(new_size.gt(0), new_size, sz).gather(1, ix);
  auto out = at::empty({bsz, out_len, dim}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (bsz * out_len == 0 || dim == 0) return {out, out_size};
  TORCH_CHECK(bsz * out_len < (int64_t{1} << 31), op, ": too many output rows for one launch (", bsz * out_len, ")");
  constexpr int threads = 256;
  const dim3 grid(static_cast<unsigned>(bsz * out_len), static_cast<unsigned>(std::min<int64_t>(
                                                             (dim + threads - 1) / threads, 65535)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "merge_compact_cuda", [&] {
    merge_compact_kernel<scalar_t><<<grid, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        h.const_data_ptr<scalar_t>(), sz.const_data_ptr<float>(), new_size.const_data_ptr<float>(),
        members.const_data_ptr<int64_t>(), start.const_data_ptr<int64_t>(), stop.const_data_ptr<int64_t>(),
        ix.const_data_ptr<int64_t>(), out.data_ptr<scalar_t>(), length, out_len, dim, h.stride(0), h.stride(1));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, out_size};
}

}  // namespace tokenreduce
