// DiffTopK forward and backward on the CPU: rows in parallel across threads, a long row's
// reductions in parallel within it, at::vec lanes inside, accumulation in float (double for
// double input). Low-precision rows are converted to float once, then iterated on in cache.
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/kernels.h"
#include "cpu/reduce.h"
#include "cpu/vec_sigmoid.h"
#include "op_common.h"
#include "vsops/difftopk_math.h"
#include "vsops/segments.h"

namespace vsops {
namespace cpu {
namespace {

using difftopk::RowSolution;
using difftopk::RowStats;

template <typename T>
using acc_type_for = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Row statistics with a vector fast path for the common all-finite row; a row holding any
// inf or NaN is recounted exactly by the scalar accumulate().
template <typename T>
RowStats<T> row_stats(const T* s, int64_t n) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V inf(infinity<T>());
  V vmax(-infinity<T>()), vmin(infinity<T>()), vsum(T(0));
  bool all_finite = true;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V x = V::loadu(s + i);
    const V finite = x.abs() < inf;  // false for NaN too
    all_finite = all_finite && finite.zero_mask() == 0;
    vmax = at::vec::maximum(vmax, x);
    vmin = at::vec::minimum(vmin, x);
    vsum += x;
  }
  if (!all_finite) {
    RowStats<T> st = difftopk::empty_stats<T>();
    for (int64_t j = 0; j < n; ++j) difftopk::accumulate(st, s[j]);
    return st;
  }
  RowStats<T> st = difftopk::empty_stats<T>();
  st.max_finite = at::vec::vec_reduce_all<T>([](V a, V b) { return at::vec::maximum(a, b); }, vmax);
  st.min_finite = at::vec::vec_reduce_all<T>([](V a, V b) { return at::vec::minimum(a, b); }, vmin);
  st.sum_finite = at::vec::vec_reduce_all<T>([](V a, V b) { return a + b; }, vsum);
  st.n_finite = i;
  for (; i < n; ++i) difftopk::accumulate(st, s[i]);
  return st;
}

template <typename T>
RowSolution<T> solve_row(const T* s, int64_t n, int64_t k) {
  RowSolution<T> sol;
  difftopk::Search<T> search;
  if (!difftopk::plan_row(row_stats(s, n), k, sol, search)) return sol;
  while (!search.done) {
    const Vec<T> anchor(search.anchor), t(search.t);
    const auto sums = sum_lanes<T, 3>(n, [&](int64_t i, int64_t count, std::array<Vec<T>, 3>& parts) {
      vec_sigmoid_parts(vec_shifted_score(Vec<T>::loadu(s + i, count), anchor, t), parts[0], parts[1],
                        parts[2]);
    });
    const double residual = difftopk::newton_residual(sums[0], sums[1], double(search.target));
    difftopk::search_step(search, T(residual), T(sums[2]));
  }
  difftopk::take_threshold(search, sol);
  return sol;
}

// Gives a row of `scalar_t` as a contiguous row of its accumulation type T, converting into
// `buffer` only when the types differ.
template <typename scalar_t, typename T>
const T* row_as(const scalar_t* row, int64_t n, std::vector<T>& buffer) {
  if constexpr (std::is_same_v<scalar_t, T>) {
    return row;
  } else {
    buffer.resize(n);
    at::vec::convert(row, buffer.data(), n);
    return buffer.data();
  }
}

// Writes out[i] = value(i) for i in [0, n) where value yields Vec<T> lanes, converting to
// scalar_t through a small stack buffer when the types differ; parallel for long rows
// (a no-op split when called from a thread already working on a batch of rows).
template <typename scalar_t, typename T, typename Value>
void write_row(scalar_t* out, int64_t n, const Value& value) {
  constexpr int64_t W = Vec<T>::size();
  constexpr int64_t kChunk = 1024;
  at::parallel_for(0, n, kParallelRowGrain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, T>) {
      for (int64_t i = begin; i < end; i += W) {
        const int64_t count = std::min(W, end - i);
        value(i, count).store(out + i, count);
      }
    } else {
      T chunk[kChunk];
      for (int64_t c = begin; c < end; c += kChunk) {
        const int64_t m = std::min(kChunk, end - c);
        for (int64_t j = 0; j < m; j += W) {
          const int64_t count = std::min(W, m - j);
          value(c + j, count).store(chunk + j, count);
        }
        at::vec::convert(chunk, out + c, m);
      }
    }
  });
}

template <typename scalar_t>
void forward_rows(const at::Tensor& scores, const at::Tensor& k, const int32_t* cu,
                  const SegmentShape& shape, at::Tensor& mask, at::Tensor& state) {
  using T = acc_type_for<scalar_t>;
  const scalar_t* in = scores.data_ptr<scalar_t>();
  scalar_t* out = mask.data_ptr<scalar_t>();
  T* state_ptr = state.data_ptr<T>();
  const int64_t* k_ptr = k.data_ptr<int64_t>();
  at::parallel_for(0, shape.num_segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buffer;
    for (int64_t row = begin; row < end; ++row) {
      int64_t start, n;
      segment_bounds(cu, shape.row_length, row, start, n);
      const T* s = row_as<scalar_t, T>(in + start, n, buffer);
      const RowSolution<T> sol = solve_row(s, n, k_ptr[row]);
      difftopk::store_solution(sol, state_ptr + row * difftopk::kRowStateWidth);
      write_row<scalar_t, T>(out + start, n, [&](int64_t i, int64_t count) {
        return vec_mask_value(Vec<T>::loadu(s + i, count), sol);
      });
    }
  });
}

template <typename scalar_t>
void backward_rows(const at::Tensor& grad, const at::Tensor& scores, const at::Tensor& state,
                   const int32_t* cu, const SegmentShape& shape, at::Tensor& grad_scores) {
  using T = acc_type_for<scalar_t>;
  const scalar_t* s_in = scores.data_ptr<scalar_t>();
  const scalar_t* g_in = grad.data_ptr<scalar_t>();
  scalar_t* out = grad_scores.data_ptr<scalar_t>();
  const T* state_ptr = state.data_ptr<T>();
  at::parallel_for(0, shape.num_segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> s_buffer, g_buffer;
    for (int64_t row = begin; row < end; ++row) {
      int64_t start, n;
      segment_bounds(cu, shape.row_length, row, start, n);
      const T* s = row_as<scalar_t, T>(s_in + start, n, s_buffer);
      const T* g = row_as<scalar_t, T>(g_in + start, n, g_buffer);
      const RowSolution<T> sol =
          difftopk::load_solution(state_ptr + row * difftopk::kRowStateWidth);
      // Rows with an infinite or NaN threshold are saturated limits: take the scalar path.
      const bool finite_t = std::abs(sol.t) < infinity<T>();
      auto slope = [&](int64_t i, int64_t count) {
        if (finite_t) return vec_mask_slope_finite_t(Vec<T>::loadu(s + i, count), sol);
        T lanes[Vec<T>::size()] = {};
        for (int64_t j = 0; j < count; ++j) lanes[j] = difftopk::mask_slope(s[i + j], sol);
        return Vec<T>::loadu(lanes);
      };
      const auto sums = sum_lanes<T, 2>(n, [&](int64_t i, int64_t count, std::array<Vec<T>, 2>& parts) {
        parts[1] = slope(i, count);
        parts[0] = parts[1] * Vec<T>::loadu(g + i, count);
      });
      const T shift = difftopk::backward_shift(T(sums[0]), T(sums[1]));
      write_row<scalar_t, T>(out + start, n, [&](int64_t i, int64_t count) {
        return slope(i, count) * (Vec<T>::loadu(g + i, count) - Vec<T>(shift));
      });
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> difftopk_forward(const at::Tensor& scores, const at::Tensor& k,
                                                    const std::optional<at::Tensor>& cu_seqlens) {
  const SegmentShape shape = check_scores_layout(scores, cu_seqlens);
  check_k(k, scores, cu_seqlens, shape);
  at::Tensor mask = at::empty_like(scores);
  at::Tensor state = at::empty({shape.num_segments, difftopk::kRowStateWidth},
                               scores.options().dtype(state_dtype_for(scores.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "vsops::difftopk_forward", [&] {
                                    forward_rows<scalar_t>(scores, k, cu_seqlens_data(cu_seqlens),
                                                           shape, mask, state);
                                  });
  return {mask, state};
}

at::Tensor difftopk_backward(const at::Tensor& grad, const at::Tensor& scores,
                             const at::Tensor& row_state,
                             const std::optional<at::Tensor>& cu_seqlens) {
  const SegmentShape shape = check_scores_layout(scores, cu_seqlens);
  check_backward_inputs(grad, scores, row_state, shape.num_segments);
  at::Tensor grad_scores = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "vsops::difftopk_backward", [&] {
                                    backward_rows<scalar_t>(grad, scores, row_state,
                                                            cu_seqlens_data(cu_seqlens), shape,
                                                            grad_scores);
                                  });
  return grad_scores;
}

}  // namespace cpu
}  // namespace vsops
