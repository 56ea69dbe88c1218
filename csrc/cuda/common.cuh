// Shared pieces of the CUDA kernels (c10 headers only: ATen/cuda/CUDAContext.h needs cuSPARSE/cuBLAS
// headers a bare toolkit may lack): the current stream and device guard, warp reductions, and
// 16-byte vector loads (what Hopper's memory system needs to reach copy bandwidth) with a scalar
// fallback when rows are not 16-byte aligned.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>

namespace tokenreduce {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// N elements of T in one 16-byte load
template <typename T>
struct alignas(16) Pack {
  static constexpr int N = 16 / sizeof(T);
  T v[N];
};

// whether rows of `width` elements starting at `ptr`, `stride` elements apart, allow 16-byte loads
template <typename T>
inline bool can_pack(const void* ptr, int64_t width, int64_t stride) {
  constexpr int64_t n = Pack<T>::N;
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && width % n == 0 && stride % n == 0;
}

inline int blocks_for(int64_t items, int per_block) {
  return static_cast<int>((items + per_block - 1) / per_block);
}

}  // namespace tokenreduce
