// Accurate, parallel sums of two per-element quantities over a long row.
#pragma once

#include <utility>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

namespace vsops {
namespace cpu {

// Lanes accumulate in T within blocks of kSumBlock elements and blocks accumulate in double,
// so a million-element float row loses no more than a 4096-element one.
constexpr int64_t kSumBlock = 4096;
// Rows shorter than this are summed by one thread (threads then split the batch instead).
constexpr int64_t kParallelRowGrain = 1 << 15;

// `lanes(i, count, a, b)` loads elements [i, i + count) (count <= Vec size) and returns their
// two contributions in a and b; lanes past count are zeroed here.
template <typename T, typename Lanes>
std::pair<double, double> sum_pair(int64_t n, const Lanes& lanes) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  auto block_sum = [&](int64_t begin, int64_t end) {
    std::pair<double, double> total{0.0, 0.0};
    for (int64_t b = begin; b < end; b += kSumBlock) {
      const int64_t block_end = std::min(end, b + kSumBlock);
      Vec acc_a(T(0)), acc_b(T(0));
      int64_t i = b;
      for (; i + W <= block_end; i += W) {
        Vec a, c;
        lanes(i, W, a, c);
        acc_a += a;
        acc_b += c;
      }
      if (i < block_end) {
        const int64_t count = block_end - i;
        Vec a, c;
        lanes(i, count, a, c);
        acc_a += Vec::set(Vec(T(0)), a, count);
        acc_b += Vec::set(Vec(T(0)), c, count);
      }
      total.first += at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, acc_a);
      total.second += at::vec::vec_reduce_all<T>([](Vec x, Vec y) { return x + y; }, acc_b);
    }
    return total;
  };
  return at::parallel_reduce(
      int64_t(0), n, kParallelRowGrain, std::pair<double, double>{0.0, 0.0},
      [&](int64_t begin, int64_t end, std::pair<double, double> ident) {
        const auto part = block_sum(begin, end);
        return std::pair<double, double>{ident.first + part.first, ident.second + part.second};
      },
      [](std::pair<double, double> x, std::pair<double, double> y) {
        return std::pair<double, double>{x.first + y.first, x.second + y.second};
      });
}

}  // namespace cpu
}  // namespace vsops
