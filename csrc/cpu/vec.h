// Small loops the compiler vectorises without -ffast-math: independent float lanes, summed at the end.
#pragma once

#include <cstdint>

namespace tokenreduce {

constexpr int kLanes = 8;

// a . b, with a and b converted to float on the fly
template <typename A, typename B>
inline float dot_lanes(const A* a, const B* b, int64_t n) {
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<float>(a[i + l]) * static_cast<float>(b[i + l]);
  }
  float tail = 0.f;
  for (; i < n; ++i) tail += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  double total = tail;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return static_cast<float>(total);
}

}  // namespace tokenreduce
