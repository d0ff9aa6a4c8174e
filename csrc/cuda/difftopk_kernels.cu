// DiffTopK forward and backward: one thread block per segment. The per-row math (statistics,
// bracket, safeguarded Newton, limit values, Eq. 8) is vsops/difftopk_math.h; this file only
// distributes its sums over the threads of a block.
//
// Every thread of a block evaluates plan_row() and search_step() on the same block-reduced
// values, so the Newton loop is uniform and needs no broadcast of the search state.
//
// Rows whose cache fits kCacheBytes are read from global memory once and then served from
// shared memory. Each thread reads back only the entries it wrote itself (same strided
// index pattern in every pass), so the cache needs no barrier of its own.
#include "cuda/kernel_common.cuh"
#include "cuda/launch.h"
#include "vsops/difftopk_math.h"
#include "vsops/math.h"

namespace vsops {
namespace cuda {
namespace {

using difftopk::RowSolution;
using difftopk::RowStats;

template <typename In>
struct ToAcc {
  __device__ __forceinline__ Acc<In> operator()(In x) const { return Scalar<In>::load(x); }
};

// A row of scores in the accumulation type.
template <typename In>
using ScoreRow = CachedRow<In, ToAcc<In>>;

// This block's row of the [S, kRowStateWidth] row_state tensor.
template <typename T>
__device__ __forceinline__ T* block_row_state(T* row_state) {
  return row_state + static_cast<int64_t>(blockIdx.x) * difftopk::kRowStateWidth;
}

// f(t) = sum sigmoid(s + t) split as in sigmoid_parts(): the count of s + t >= 0 is exact,
// so f(t) - k keeps its precision when k is close to n.
template <typename T>
struct SigmoidSums {
  int64_t above;  // #(s + t >= 0)
  T deviation;    // sum of sigmoid(s + t) - [s + t >= 0]
  T slope;        // f'(t)
};

// First pass: the row statistics plan_row() needs, filling the cache on the way.
template <typename In>
__device__ RowStats<Acc<In>> row_stats(const ScoreRow<In>& row) {
  using T = Acc<In>;
  RowStats<T> stats = difftopk::empty_stats<T>();
  for (int64_t i = threadIdx.x; i < row.length; i += kBlockThreads) {
    const T s = row.load(i);
    if (row.cache != nullptr) row.cache[i] = s;
    difftopk::accumulate(stats, s);
  }
  return block_allreduce(stats, [](const RowStats<T>& a, const RowStats<T>& b) {
    return difftopk::combine(a, b);
  });
}

template <typename In>
__device__ SigmoidSums<Acc<In>> sigmoid_sums(const ScoreRow<In>& row, Acc<In> anchor, Acc<In> t) {
  using T = Acc<In>;
  SigmoidSums<T> sums{0, T(0), T(0)};
  for (int64_t i = threadIdx.x; i < row.length; i += kBlockThreads) {
    T above, deviation, slope;
    sigmoid_parts(difftopk::shifted_score(row[i], anchor, t), above, deviation, slope);
    sums.above += above != T(0);
    sums.deviation += deviation;
    sums.slope += slope;
  }
  return block_allreduce(sums, [](const SigmoidSums<T>& a, const SigmoidSums<T>& b) {
    return SigmoidSums<T>{a.above + b.above, a.deviation + b.deviation, a.slope + b.slope};
  });
}

// One pass over the row per Newton iteration; closed-form rows need none.
template <typename In>
__device__ RowSolution<Acc<In>> solve_row(const ScoreRow<In>& row, const RowStats<Acc<In>>& stats,
                                          int64_t k) {
  using T = Acc<In>;
  RowSolution<T> solution{};
  difftopk::Search<T> search{};
  if (!difftopk::plan_row(stats, k, solution, search)) return solution;
  while (!search.done) {
    const SigmoidSums<T> sums = sigmoid_sums(row, search.anchor, search.t);
    const double residual = difftopk::newton_residual(sums.above, sums.deviation, search.target);
    difftopk::search_step(search, static_cast<T>(residual), sums.slope);
  }
  difftopk::take_threshold(search, solution);
  return solution;
}

template <typename In>
__global__ void __launch_bounds__(kBlockThreads)
    difftopk_forward_kernel(const In* __restrict__ scores, const int64_t* __restrict__ k,
                            In* __restrict__ mask, Acc<In>* __restrict__ row_state,
                            SegmentLayout layout, int64_t cache_capacity) {
  using T = Acc<In>;
  const Segment segment = segment_of(layout, blockIdx.x);
  const ScoreRow<In> row{scores + segment.begin,
                         segment.length <= cache_capacity ? dynamic_smem<T>() : nullptr,
                         segment.length};
  const RowSolution<T> solution = solve_row(row, row_stats(row), k[blockIdx.x]);
  In* out = mask + segment.begin;
  for (int64_t i = threadIdx.x; i < row.length; i += kBlockThreads) {
    out[i] = Scalar<In>::store(difftopk::mask_value(row[i], solution));
  }
  if (threadIdx.x == 0) difftopk::store_solution(solution, block_row_state(row_state));
}

// What the backward's second pass needs per element, cached between its two passes.
template <typename T>
struct SlopeAndGrad {
  T v;  // dM/dz, M's slope
  T g;  // dL/dM
};

template <typename T>
struct BackwardSums {
  T v;
  T vg;
};

template <typename In>
__device__ __forceinline__ SlopeAndGrad<Acc<In>> slope_and_grad(const In* scores, const In* grad,
                                                                int64_t i,
                                                                const RowSolution<Acc<In>>& sol) {
  return SlopeAndGrad<Acc<In>>{difftopk::mask_slope(Scalar<In>::load(scores[i]), sol),
                               Scalar<In>::load(grad[i])};
}

// Two passes: sum(v) and sum(v g), then v * (g - shift). The second pass reads the cached
// (v, g) or recomputes them from global memory for rows that do not fit.
template <typename In>
__global__ void __launch_bounds__(kBlockThreads)
    difftopk_backward_kernel(const In* __restrict__ grad, const In* __restrict__ scores,
                             const Acc<In>* __restrict__ row_state, In* __restrict__ grad_scores,
                             SegmentLayout layout, int64_t cache_capacity) {
  using T = Acc<In>;
  const Segment segment = segment_of(layout, blockIdx.x);
  const RowSolution<T> solution = difftopk::load_solution(block_row_state(row_state));
  const In* s = scores + segment.begin;
  const In* g = grad + segment.begin;
  SlopeAndGrad<T>* cache =
      segment.length <= cache_capacity ? dynamic_smem<SlopeAndGrad<T>>() : nullptr;

  BackwardSums<T> sums{T(0), T(0)};
  for (int64_t i = threadIdx.x; i < segment.length; i += kBlockThreads) {
    const SlopeAndGrad<T> e = slope_and_grad(s, g, i, solution);
    if (cache != nullptr) cache[i] = e;
    sums.v += e.v;
    sums.vg += e.v * e.g;
  }
  sums = block_allreduce(sums, [](const BackwardSums<T>& a, const BackwardSums<T>& b) {
    return BackwardSums<T>{a.v + b.v, a.vg + b.vg};
  });
  const T shift = difftopk::backward_shift(sums.vg, sums.v);

  In* out = grad_scores + segment.begin;
  for (int64_t i = threadIdx.x; i < segment.length; i += kBlockThreads) {
    const SlopeAndGrad<T> e = cache != nullptr ? cache[i] : slope_and_grad(s, g, i, solution);
    out[i] = Scalar<In>::store(e.v * (e.g - shift));
  }
}

template <typename In>
cudaError_t launch_forward(const DiffTopKForwardParams& p, cudaStream_t stream) {
  using T = Acc<In>;
  const RowCache cache = row_cache(p.layout, sizeof(T));
  difftopk_forward_kernel<In><<<static_cast<unsigned>(p.layout.num_segments), kBlockThreads,
                                cache.bytes, stream>>>(
      static_cast<const In*>(p.scores), p.k, static_cast<In*>(p.mask),
      static_cast<T*>(p.row_state), p.layout, cache.capacity);
  return cudaGetLastError();
}

template <typename In>
cudaError_t launch_backward(const DiffTopKBackwardParams& p, cudaStream_t stream) {
  using T = Acc<In>;
  const RowCache cache = row_cache(p.layout, sizeof(SlopeAndGrad<T>));
  difftopk_backward_kernel<In><<<static_cast<unsigned>(p.layout.num_segments), kBlockThreads,
                                 cache.bytes, stream>>>(
      static_cast<const In*>(p.grad), static_cast<const In*>(p.scores),
      static_cast<const T*>(p.row_state), static_cast<In*>(p.grad_scores), p.layout,
      cache.capacity);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_difftopk_forward(const DiffTopKForwardParams& params, cudaStream_t stream) {
  return launch_per_segment(params.layout, params.dtype, [&](auto tag) {
    return launch_forward<typename decltype(tag)::type>(params, stream);
  });
}

cudaError_t launch_difftopk_backward(const DiffTopKBackwardParams& params, cudaStream_t stream) {
  return launch_per_segment(params.layout, params.dtype, [&](auto tag) {
    return launch_backward<typename decltype(tag)::type>(params, stream);
  });
}

}  // namespace cuda
}  // namespace vsops
