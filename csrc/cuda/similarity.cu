// Adjacent-frame similarity fused with the threshold test (one warp per row, reading the row and its
// predecessor once with 16-byte loads), and run detection (one thread per row following its run).
#include "../checks.h"
#include "../ops.h"
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace tokenreduce {
namespace {

constexpr int kRowsPerBlock = 8;

template <typename T, bool kPacked>
__global__ void adjacent_similarity_kernel(const T* __restrict__ hidden, const int64_t* __restrict__ pred,
                                           const bool* __restrict__ candidate, float* __restrict__ sim,
                                           bool* __restrict__ ok, int64_t rows, int64_t length, int64_t dim,
                                           int64_t stride_b, int64_t stride_l, float threshold) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= rows) return;
  const int64_t b = i / length, l = i % length, j = pred[i];
  CUDA_KERNEL_ASSERT(j < length);
  if (j < 0) {
    if (lane == 0) {
      sim[i] = -INFINITY;
      ok[i] = false;
    }
    return;
  }
  const T* x = hidden + b * stride_b + l * stride_l;
  const T* y = hidden + b * stride_b + j * stride_l;
  float xx = 0.f, yy = 0.f, xy = 0.f;
  if constexpr (kPacked) {
    constexpr int n = Pack<T>::N;
    const Pack<T>* xp = reinterpret_cast<const Pack<T>*>(x);
    const Pack<T>* yp = reinterpret_cast<const Pack<T>*>(y);
    for (int64_t c = lane; c < dim / n; c += kWarp) {
      const Pack<T> a = xp[c], e = yp[c];
#pragma unroll
      for (int k = 0; k < n; ++k) {
        const float u = static_cast<float>(a.v[k]), v = static_cast<float>(e.v[k]);
        xx += u * u;
        yy += v * v;
        xy += u * v;
      }
    }
  } else {
    for (int64_t c = lane; c < dim; c += kWarp) {
      const float u = static_cast<float>(x[c]), v = static_cast<float>(y[c]);
      xx += u * u;
      yy += v * v;
      xy += u * v;
    }
  }
  xx = warp_sum(xx);
  yy = warp_sum(yy);
  xy = warp_sum(xy);
  if (lane == 0) {
    const float cos = xy / (fmaxf(sqrtf(xx), 1e-8f) * fmaxf(sqrtf(yy), 1e-8f));  // F.cosine_similarity's eps
    sim[i] = cos;
    ok[i] = (candidate == nullptr || candidate[i]) && cos >= threshold;
  }
}

__global__ void fold_runs_kernel(const int64_t* __restrict__ pred, const bool* __restrict__ merge,
                                 int64_t* __restrict__ dest, int64_t rows, int64_t length, int64_t steps) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  const int64_t base = (i / length) * length;
  int64_t r = i % length;
  // each row checks its own link (the CPU entry point's host check): -1 or an earlier row, so runs end
  CUDA_KERNEL_ASSERT(pred[i] >= -1 && pred[i] < r);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t p = pred[base + r];
    const int64_t next = (merge[base + r] && p >= 0) ? p : r;
    if (next == r) break;
    r = next;
  }
  dest[i] = r;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> adjacent_similarity_cuda(const at::Tensor& hidden, const at::Tensor& pred,
                                                            const c10::optional<at::Tensor>& candidate,
                                                            double threshold) {
  const char* op = "adjacent_similarity";
  check_dim(hidden, 3, op, "hidden", "[B, L, D]");
  check_float(hidden, op, "hidden");
  const int64_t bsz = hidden.size(0), length = hidden.size(1), dim = hidden.size(2);
  check_dim(pred, 2, op, "pred", "[B, L] int64");
  check_dtype(pred, at::kLong, op, "pred");
  TORCH_CHECK(pred.size(0) == bsz && pred.size(1) == length, op, ": pred must be [B, L] = [", bsz, ", ", length,
              "], got ", pred.sizes());
  check_same_device(hidden, pred, op);
  at::Tensor cand;
  if (candidate.has_value()) {
    cand = candidate->contiguous();
    check_dtype(cand, at::kBool, op, "candidate");
    TORCH_CHECK(cand.sizes() == pred.sizes(), op, ": candidate must have pred's shape ", pred.sizes(), ", got ",
                cand.sizes());
    check_same_device(hidden, cand, op);
  }
  const c10::cuda::CUDAGuard guard(hidden.device());
  auto h = rows_view(hidden);
  auto p = pred.contiguous();
  auto sim = at::empty({bsz, length}, hidden.options().dtype(at::kFloat));
  auto ok = at::empty({bsz, length}, hidden.options().dtype(at::kBool));
  const int64_t rows = bsz * length;
  if (rows == 0) return {sim, ok};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool* cp = cand.defined() ? cand.const_data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "adjacent_similarity_cuda", [&] {
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const bool packed = can_pack<scalar_t>(hp, dim, h.stride(1)) && h.stride(0) % Pack<scalar_t>::N == 0;
    auto kernel = packed ? adjacent_similarity_kernel<scalar_t, true> : adjacent_similarity_kernel<scalar_t, false>;
    kernel<<<blocks_for(rows, kRowsPerBlock), kRowsPerBlock * kWarp, 0, stream>>>(
        hp, p.const_data_ptr<int64_t>(), cp, sim.data_ptr<float>(), ok.data_ptr<bool>(), rows, length, dim,
        h.stride(0), h.stride(1), static_cast<float>(threshold));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sim, ok};
}

at::Tensor fold_runs_cuda(const at::Tensor& pred, const at::Tensor& merge, int64_t steps) {
  const char* op = "fold_runs";
  check_dim(pred, 2, op, "pred", "[B, L] int64");
  check_dtype(pred, at::kLong, op, "pred");
  check_dtype(merge, at::kBool, op, "merge");
  TORCH_CHECK(merge.sizes() == pred.sizes(), op, ": merge must have pred's shape ", pred.sizes(), ", got ",
              merge.sizes());
  TORCH_CHECK(steps >= 1, op, ": steps must be >= 1, got ", steps);
  check_same_device(pred, merge, op);
  const c10::cuda::CUDAGuard guard(pred.device());
  auto p = pred.contiguous();
  auto mg = merge.contiguous();
  auto dest = at::empty_like(p);
  const int64_t rows = p.numel();
  if (rows == 0) return dest;
  fold_runs_kernel<<<blocks_for(rows, 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p.const_data_ptr<int64_t>(), mg.const_data_ptr<bool>(), dest.data_ptr<int64_t>(), rows, p.size(1), steps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dest;
}

}  // namespace tokenreduce
