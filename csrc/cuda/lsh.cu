// LSH on the GPU: one block per vector projects it on all planes (consecutive threads read consecutive
// planes of a [dim, bits] row: coalesced) and packs the sign bits; Hamming top-1 with one block per
// query, __popcll over the XORs, and a min over (distance * S + index), which breaks ties by index.
#include "../checks.h"
#include "../ops.h"
#include "common.cuh"

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>

namespace tokenreduce {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void signatures_kernel(const T* __restrict__ x, const float* __restrict__ planes,
                                  int64_t* __restrict__ out, int64_t dim, int64_t bits, int64_t words,
                                  int64_t stride) {
  extern __shared__ unsigned char shared[];
  float* xs = reinterpret_cast<float*>(shared);                     // [dim]
  unsigned char* positive = shared + dim * sizeof(float);           // [bits]
  const int64_t row = blockIdx.x;
  for (int64_t c = threadIdx.x; c < dim; c += blockDim.x) xs[c] = static_cast<float>(x[row * stride + c]);
  __syncthreads();
  for (int64_t j = threadIdx.x; j < bits; j += blockDim.x) {
    float acc = 0.f;
    for (int64_t c = 0; c < dim; ++c) acc += xs[c] * planes[c * bits + j];
    positive[j] = acc > 0.f;
  }
  __syncthreads();
  for (int64_t w = threadIdx.x; w < words; w += blockDim.x) {
    unsigned long long word = 0;
    for (int64_t i = 0; i < 64 && w * 64 + i < bits; ++i) word |= static_cast<unsigned long long>(positive[w * 64 + i]) << i;
    out[row * words + w] = static_cast<int64_t>(word);
  }
}

__global__ void hamming_top1_kernel(const unsigned long long* __restrict__ query,
                                    const unsigned long long* __restrict__ store, int64_t* __restrict__ index,
                                    int64_t* __restrict__ distance, int64_t ns, int64_t words) {
  __shared__ unsigned long long best[kThreads];
  const int64_t q = blockIdx.x;
  unsigned long long mine = ~0ull;
  for (int64_t s = threadIdx.x; s < ns; s += blockDim.x) {
    unsigned long long d = 0;
    for (int64_t w = 0; w < words; ++w) d += __popcll(query[q * words + w] ^ store[s * words + w]);
    const unsigned long long key = d * static_cast<unsigned long long>(ns) + s;
    mine = key < mine ? key : mine;
  }
  best[threadIdx.x] = mine;
  __syncthreads();
  for (int span = blockDim.x / 2; span > 0; span /= 2) {
    if (threadIdx.x < span && best[threadIdx.x + span] < best[threadIdx.x]) best[threadIdx.x] = best[threadIdx.x + span];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    index[q] = static_cast<int64_t>(best[0] % ns);
    distance[q] = static_cast<int64_t>(best[0] / ns);
  }
}

}  // namespace

at::Tensor lsh_signatures_cuda(const at::Tensor& x, const at::Tensor& planes) {
  const char* op = "lsh_signatures";
  check_lsh_args(x, planes, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), dim = x.size(1), bits = planes.size(1), words = (bits + 63) / 64;
  const int64_t shared = dim * static_cast<int64_t>(sizeof(float)) + bits;
  TORCH_CHECK(shared <= 48 * 1024, op, ": dim * 4 + bits must fit 48 KiB of shared memory, got dim ", dim,
              ", bits ", bits);
  auto out = at::zeros({rows, words}, x.options().dtype(at::kLong));
  if (rows == 0) return out;
  auto xs = rows_view(x);
  auto pl = planes.to(at::kFloat).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xs.scalar_type(), "lsh_signatures_cuda", [&] {
    signatures_kernel<scalar_t><<<static_cast<unsigned>(rows), kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        xs.const_data_ptr<scalar_t>(), pl.const_data_ptr<float>(), out.data_ptr<int64_t>(), dim, bits, words,
        xs.stride(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hamming_top1_cuda(const at::Tensor& query, const at::Tensor& store) {
  const char* op = "hamming_top1";
  check_hamming_args(query, store, op);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t nq = query.size(0), ns = store.size(0), words = query.size(1);
  if (ns == 0 || nq == 0) {
    return {at::full({nq}, -1, query.options()), at::full({nq}, 64 * words, query.options())};
  }
  auto q = query.contiguous();
  auto s = store.contiguous();
  auto index = at::empty({nq}, query.options());
  auto distance = at::empty({nq}, query.options());
  hamming_top1_kernel<<<static_cast<unsigned>(nq), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const unsigned long long*>(q.const_data_ptr<int64_t>()),
      reinterpret_cast<const unsigned long long*>(s.const_data_ptr<int64_t>()), index.data_ptr<int64_t>(),
      distance.data_ptr<int64_t>(), ns, words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {index, distance};
}

}  // namespace tokenreduce
