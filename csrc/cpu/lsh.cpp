// LSH (tokenreduce/ops/lsh.py): sign bits of projections on random hyperplanes packed into int64 words,
// and Hamming top-1 against a store with popcount, without the reference's [Q, S, W] XOR tensor.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "../checks.h"
#include "../ops.h"
#include "ops_alloc.h"

namespace tokenreduce {

at::Tensor lsh_signatures_cpu(const at::Tensor& x, const at::Tensor& planes) {
  const char* op = "lsh_signatures";
  check_lsh_args(x, planes, op);
  const int64_t rows = x.size(0), bits = planes.size(1), words = (bits + 63) / 64;
  // the projection is the reference's own float32 matmul (BLAS beats a hand loop on CPU, and the signs
  // then match bit for bit); the kernel fuses the sign test and the packing, which the reference does
  // with a bool tensor, a 64x wider int64 product and a sum
  auto proj = at::matmul(x.to(at::kFloat), planes.to(at::kFloat)).contiguous();
  auto out = at::zeros({rows, words}, x.options().dtype(at::kLong));
  const float* pp = proj.const_data_ptr<float>();
  int64_t* op_ = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint64_t* w = reinterpret_cast<uint64_t*>(op_ + r * words);
      const float* p = pp + r * bits;
      for (int64_t j = 0; j < bits; ++j) {
        if (p[j] > 0.f) w[j / 64] |= uint64_t{1} << (j % 64);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hamming_top1_cpu(const at::Tensor& query, const at::Tensor& store) {
  const char* op = "hamming_top1";
  check_hamming_args(query, store, op);
  const int64_t nq = query.size(0), ns = store.size(0), words = query.size(1);
  auto q = query.contiguous();
  auto s = store.contiguous();
  auto index = at::empty({nq}, query.options());
  auto distance = at::empty({nq}, query.options());
  const uint64_t* qp = reinterpret_cast<const uint64_t*>(q.const_data_ptr<int64_t>());
  const uint64_t* sp = reinterpret_cast<const uint64_t*>(s.const_data_ptr<int64_t>());
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* dp = distance.data_ptr<int64_t>();
  at::parallel_for(0, nq, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t best = -1, best_d = 64 * words;  // an empty store: index -1, distance 64 * W
      for (int64_t j = 0; j < ns; ++j) {
        int64_t d = 0;
        for (int64_t w = 0; w < words; ++w) d += __builtin_popcountll(qp[i * words + w] ^ sp[j * words + w]);
        if (best < 0 || d < best_d) {  // strict: ties keep the lowest index
          best = j;
          best_d = d;
        }
      }
      ip[i] = best;
      dp[i] = best_d;
    }
  });
  return {index, distance};
}

}  // namespace tokenreduce
