// Query-key importance in three launches, no repeated keys and no [Hq, Lq, Lk] attention matrix:
// (1) one warp per key row scores it against every query of its key head's group, held in shared
// memory (the key is read once for all g * n queries); (2) one block per query row finds the softmax
// max and sum; (3) one thread per key sums the probabilities over heads and queries in a fixed order
// (deterministic) and divides by Hq * n.
#include "../checks.h"
#include "../ops.h"
#include "common.cuh"

#include <ATen/ops/empty.h>

namespace tokenreduce {
namespace {

constexpr int kKeysPerBlock = 8;
constexpr int kMaxDimPerLane = 16;  // head_dim <= 512
constexpr int64_t kSharedBytes = 32 * 1024;

template <typename T>
__global__ void logits_kernel(const T* __restrict__ query, const T* __restrict__ key,
                              const int64_t* __restrict__ q_index, const bool* __restrict__ key_valid,
                              float* __restrict__ logits, int64_t hkv, int64_t group, int64_t n, int64_t lq, int64_t lk,
                              int64_t dim, int64_t rows_per_chunk, float scaling, int64_t qs0, int64_t qs1,
                              int64_t qs2, int64_t ks0, int64_t ks1, int64_t ks2) {
  extern __shared__ float qs[];  // [rows_per_chunk, dim]
  const int64_t bh = blockIdx.x, b = bh / hkv, h = bh % hkv;
  const int64_t rows = group * n, r0 = static_cast<int64_t>(blockIdx.z) * rows_per_chunk;
  const int64_t chunk = min(rows_per_chunk, rows - r0);
  for (int64_t e = threadIdx.x; e < chunk * dim; e += blockDim.x) {
    const int64_t r = r0 + e / dim, c = e % dim, gi = r / n, t = r % n;
    CUDA_KERNEL_ASSERT(q_index[b * n + t] >= 0 && q_index[b * n + t] < lq);
    qs[e] = static_cast<float>(query[b * qs0 + (h * group + gi) * qs1 + q_index[b * n + t] * qs2 + c]);
  }
  __syncthreads();
  const int64_t k = static_cast<int64_t>(blockIdx.y) * kKeysPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (k >= lk) return;
  float kreg[kMaxDimPerLane];
  const T* krow = key + b * ks0 + h * ks1 + k * ks2;
#pragma unroll
  for (int t = 0; t < kMaxDimPerLane; ++t) {
    const int64_t c = lane + t * kWarp;
    kreg[t] = c < dim ? static_cast<float>(krow[c]) : 0.f;
  }
  const bool valid = key_valid[b * lk + k];
  for (int64_t rr = 0; rr < chunk; ++rr) {
    const int64_t r = r0 + rr;
    const float* q = qs + rr * dim;
    float part = 0.f;
#pragma unroll
    for (int t = 0; t < kMaxDimPerLane; ++t) {
      const int64_t c = lane + t * kWarp;
      if (c < dim) part += q[c] * kreg[t];
    }
    part = warp_sum(part);
    if (lane == 0) {
      const bool allowed = valid && k <= q_index[b * n + r % n];  // causal
      logits[(bh * rows + r) * lk + k] = allowed ? part * scaling : -INFINITY;
    }
  }
}

__global__ void softmax_stats_kernel(const float* __restrict__ logits, float* __restrict__ top,
                                     float* __restrict__ inv_sum, int64_t lk) {
  __shared__ float scratch[kWarp];
  const int64_t row = blockIdx.x;
  const float* l = logits + row * lk;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < lk; j += blockDim.x) m = fmaxf(m, l[j]);
  m = warp_max(m);
  if (lane == 0) scratch[warp] = m;
  __syncthreads();
  m = lane < warps ? scratch[lane] : -INFINITY;
  m = warp_max(m);
  __syncthreads();
  float s = 0.f;
  if (m != -INFINITY) {
    for (int64_t j = threadIdx.x; j < lk; j += blockDim.x) s += __expf(l[j] - m);
  }
  s = warp_sum(s);
  if (lane == 0) scratch[warp] = s;
  __syncthreads();
  s = lane < warps ? scratch[lane] : 0.f;
  s = warp_sum(s);
  if (threadIdx.x == 0) {
    top[row] = m;
    inv_sum[row] = m == -INFINITY ? 0.f : 1.f / s;  // no visible key: the reference's NaN row, zeroed
  }
}

__global__ void average_kernel(const float* __restrict__ logits, const float* __restrict__ top,
                               const float* __restrict__ inv_sum, float* __restrict__ out, int64_t bsz,
                               int64_t rows_per_sample, int64_t lk, float inv_count) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= bsz * lk) return;
  const int64_t b = e / lk, k = e % lk;
  float total = 0.f;
  for (int64_t r = b * rows_per_sample; r < (b + 1) * rows_per_sample; ++r) {
    if (inv_sum[r] > 0.f) total += __expf(logits[r * lk + k] - top[r]) * inv_sum[r];
  }
  out[e] = total * inv_count;
}

}  // namespace

at::Tensor qk_importance_cuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& q_index,
                              const at::Tensor& key_valid, double scaling) {
  const char* op = "qk_importance";
  check_importance_args(query, key, q_index, key_valid, op);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t bsz = query.size(0), hq = query.size(1), dim = query.size(3);
  const int64_t hkv = key.size(1), lk = key.size(2), n = q_index.size(1), group = hq / hkv, rows = group * n;
  TORCH_CHECK(dim <= kMaxDimPerLane * kWarp, op, ": head_dim up to ", kMaxDimPerLane * kWarp, ", got ", dim);
  auto out = at::empty({bsz, lk}, query.options().dtype(at::kFloat));
  if (bsz * lk == 0) return out;
  if (rows == 0) return out.zero_();
  auto q = rows_view(query);
  auto k = rows_view(key);
  auto qi = q_index.contiguous();
  auto kv = key_valid.contiguous();
  auto logits = at::empty({bsz * hkv * rows, lk}, out.options());
  auto top = at::empty({bsz * hkv * rows}, out.options());
  auto inv_sum = at::empty({bsz * hkv * rows}, out.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows_per_chunk = std::max<int64_t>(1, std::min<int64_t>(rows, kSharedBytes / (4 * dim)));
  const dim3 grid(static_cast<unsigned>(bsz * hkv), static_cast<unsigned>(blocks_for(lk, kKeysPerBlock)),
                  static_cast<unsigned>((rows + rows_per_chunk - 1) / rows_per_chunk));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "qk_importance_cuda", [&] {
    logits_kernel<scalar_t><<<grid, kKeysPerBlock * kWarp, rows_per_chunk * dim * sizeof(float), stream>>>(
        q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), qi.const_data_ptr<int64_t>(),
        kv.const_data_ptr<bool>(), logits.data_ptr<float>(), hkv, group, n, q.size(2), lk, dim, rows_per_chunk,
        static_cast<float>(scaling), q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  softmax_stats_kernel<<<static_cast<unsigned>(bsz * hkv * rows), 256, 0, stream>>>(
      logits.const_data_ptr<float>(), top.data_ptr<float>(), inv_sum.data_ptr<float>(), lk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  average_kernel<<<blocks_for(bsz * lk, 256), 256, 0, stream>>>(
      logits.const_data_ptr<float>(), top.const_data_ptr<float>(), inv_sum.const_data_ptr<float>(),
      out.data_ptr<float>(), bsz, hkv * rows, lk, 1.f / static_cast<float>(hq * n));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace tokenreduce
