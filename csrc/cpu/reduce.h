// Accurate, parallel sums of two per-element quantities over a long row.
#pragma once

#include <array>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

namespace vsops {
namespace cpu {

// Lanes accumulate in T within blocks of kSumBlock elements and blocks accumulate in double,
// so a million-element float row loses no more than a 4096-element one.
constexpr int64_t kSumBlock = 4096;
// Rows shorter than this are summed by one thread (threads then split the batch instead).
constexpr int64_t kParallelRowGrain = 1 << 15;

// Sums K per-element quantities over [0, n). `lanes(i, count, parts)` loads elements
// [i, i + count) (count <= Vec size) and returns their K contributions in parts; lanes past
// count are zeroed here.
template <typename T, size_t K, typename Lanes>
std::array<double, K> sum_lanes(int64_t n, const Lanes& lanes) {
  using Vec = at::vec::Vectorized<T>;
  using Sums = std::array<double, K>;
  constexpr int64_t W = Vec::size();
  auto block_sum = [&](int64_t begin, int64_t end) {
    Sums total{};
    for (int64_t b = begin; b < end; b += kSumBlock) {
      const int64_t block_end = std::min(end, b + kSumBlock);
      std::array<Vec, K> acc, parts;
      acc.fill(Vec(T(0)));
      int64_t i = b;
      for (; i + W <= block_end; i += W) {
        lanes(i, W, parts);
        for (size_t q = 0; q < K; ++q) acc[q] += parts[q];
      }
      if (i < block_end) {
        const int64_t count = block_end - i;
        lanes(i, count, parts);
        for (size_t q = 0; q < K; ++q) acc[q] += Vec::set(Vec(T(0)), parts[q], count);
      }
      for (size_t q = 0; q < K; ++q) {
        total[q] += at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, acc[q]);
      }
    }
    return total;
  };
  auto add = [](Sums x, const Sums& y) {
    for (size_t q = 0; q < K; ++q) x[q] += y[q];
    return x;
  };
  return at::parallel_reduce(
      int64_t(0), n, kParallelRowGrain, Sums{},
      [&](int64_t begin, int64_t end, Sums ident) { return add(ident, block_sum(begin, end)); }, add);
}

}  // namespace cpu
}  // namespace vsops
