// The DiffTopK math, written once for the CPU kernels and the CUDA kernels.
//
// Per row (segment) s of length n and an integer k, the forward pass finds t with
// sum_i sigmoid(s_i + t) = k and returns M = sigmoid(s + t). A row is processed as:
//   1. one pass accumulating RowStats (finite min/max/sum, counts of +-inf and NaN);
//   2. plan_row(): closed-form rows (k = 0, k = n, rows whose mass sits on infinite scores,
//      rows with NaN, rows of equal scores) are solved at once; the others get a bracket
//      [lo, hi] that provably contains t and a starting guess;
//   3. a safeguarded Newton search: each iteration reduces the residual f(t) - k, with
//      f(t) = sum sigmoid(s + t) summed by parts (sigmoid_parts() in math.h) to keep its
//      precision, and f'(t) = sum sigmoid'(s + t) over the row, and calls search_step();
//   4. mask_value() per element.
// The backward (Eq. 8 of the paper) is dL/ds = v * (g - sum(v g) / sum(v)) with
// v = sigmoid'(s + t), recomputed from s and the saved RowSolution (mask_slope()).
//
// Infinite scores behave as limits of large finite ones: a row with P entries at +inf gives
// them min(1, k / P) each; a row needing more than its finite and +inf entries spreads the
// remainder evenly over its -inf entries. A row containing NaN yields NaN everywhere (the
// search is skipped, so NaN can never make it loop).
#pragma once

#include <cstdint>

#include "vsops/macros.h"
#include "vsops/math.h"

namespace vsops {
namespace difftopk {

// Newton steps needed are usually 3-8; bisection of a double bracket spanning the whole
// float range to a relative width of 1e-13 needs < 200. The cap only guarantees termination.
constexpr int kMaxSearchIterations = 200;

template <typename T>
struct RowStats {
  T max_finite;
  T min_finite;
  T sum_finite;
  int64_t n_finite;
  int64_t n_pos_inf;
  int64_t n_neg_inf;
  int64_t n_nan;
};

template <typename T>
VSOPS_HD RowStats<T> empty_stats() {
  return RowStats<T>{-infinity<T>(), infinity<T>(), T(0), 0, 0, 0, 0};
}

template <typename T>
VSOPS_HD void accumulate(RowStats<T>& st, T s) {
  if (is_nan(s)) {
    st.n_nan += 1;
  } else if (s == infinity<T>()) {
    st.n_pos_inf += 1;
  } else if (s == -infinity<T>()) {
    st.n_neg_inf += 1;
  } else {
    st.max_finite = s > st.max_finite ? s : st.max_finite;
    st.min_finite = s < st.min_finite ? s : st.min_finite;
    st.sum_finite += s;
    st.n_finite += 1;
  }
}

template <typename T>
VSOPS_HD RowStats<T> combine(const RowStats<T>& a, const RowStats<T>& b) {
  return RowStats<T>{a.max_finite > b.max_finite ? a.max_finite : b.max_finite,
                     a.min_finite < b.min_finite ? a.min_finite : b.min_finite,
                     a.sum_finite + b.sum_finite,
                     a.n_finite + b.n_finite,
                     a.n_pos_inf + b.n_pos_inf,
                     a.n_neg_inf + b.n_neg_inf,
                     a.n_nan + b.n_nan};
}

// What the forward keeps per row for the backward: the threshold and the values given to
// +inf and -inf entries (1 and 0 unless the row is saturated by infinite scores).
// Stored as three consecutive elements of the row_state tensor [S, 3].
template <typename T>
struct RowSolution {
  T t;
  T pos_inf_value;
  T neg_inf_value;
};

constexpr int kRowStateWidth = 3;

template <typename T>
VSOPS_HD void store_solution(const RowSolution<T>& sol, T* state) {
  state[0] = sol.t;
  state[1] = sol.pos_inf_value;
  state[2] = sol.neg_inf_value;
}

template <typename T>
VSOPS_HD RowSolution<T> load_solution(const T* state) {
  return RowSolution<T>{state[0], state[1], state[2]};
}

// Safeguarded Newton (Newton inside a shrinking bracket, bisection when Newton leaves it or
// stalls). `target` is k itself: +inf entries contribute exactly 1 and -inf entries 0 to
// f(t) for any finite t, so the search sums over the whole row with no per-element test.
template <typename T>
struct Search {
  T target;
  T lo;
  T hi;
  T t;
  T last_step;
  int iterations;
  bool done;
};

// A Newton step this small ends the search. Newton's error after a step d is about
// d^2 * |f''| / (2 f') <= d^2 / 2 for sigmoid sums, so the absolute part (1e-5 in float,
// far above the float noise floor of the row sums) leaves ~1e-10 in t; the relative part is
// 4 ulp of t, below which float cannot place t anyway.
template <typename T>
VSOPS_HD T search_tolerance(T t);

template <>
VSOPS_HD float search_tolerance<float>(float t) {
  return 1e-5f + 4.8e-7f * abs_(t);
}

template <>
VSOPS_HD double search_tolerance<double>(double t) {
  return 1e-12 + 8.9e-16 * abs_(t);
}

// Decides a row from its statistics. Returns true when a search is needed (then `search`
// is initialised and `sol.t` must be taken from it when done); false when `sol` is final.
// k is clamped to [0, n] so a bad k can never read or loop out of bounds (the Python
// layer rejects it before any kernel runs).
template <typename T>
VSOPS_HD bool plan_row(const RowStats<T>& st, int64_t k, RowSolution<T>& sol, Search<T>& search) {
  sol.pos_inf_value = T(1);
  sol.neg_inf_value = T(0);
  if (st.n_nan > 0) {
    sol = RowSolution<T>{quiet_nan<T>(), quiet_nan<T>(), quiet_nan<T>()};
    return false;
  }
  const int64_t n = st.n_finite + st.n_pos_inf + st.n_neg_inf;
  k = k < 0 ? 0 : (k > n ? n : k);
  if (k <= st.n_pos_inf) {
    // All of k sits on +inf entries (k = 0 included): finite entries are the t -> -inf limit.
    sol.t = -infinity<T>();
    sol.pos_inf_value = st.n_pos_inf > 0 ? T(k) / T(st.n_pos_inf) : T(0);
    return false;
  }
  if (k >= st.n_pos_inf + st.n_finite) {
    // Every finite entry is fully kept (k = n included); the rest goes to -inf entries.
    sol.t = infinity<T>();
    sol.neg_inf_value = st.n_neg_inf > 0
                            ? T(k - st.n_pos_inf - st.n_finite) / T(st.n_neg_inf)
                            : T(1);
    return false;
  }
  // 0 < k - P < F: f(t) <= P + F * sigmoid(max + t), so with base = logit((k - P) / F)
  // f(base - max) <= k <= f(base - min): a bracket of width max - min that contains t.
  const T finite_target = T(k - st.n_pos_inf);
  const T nf = T(st.n_finite);
  const T base = log_(finite_target) - log_(nf - finite_target);
  search.target = T(k);
  search.lo = base - st.max_finite;
  search.hi = base - st.min_finite;
  // Exact when all finite scores are equal (Jensen), so a good start for clustered rows.
  const T start = base - st.sum_finite / nf;
  search.t = start < search.lo ? search.lo : (start > search.hi ? search.hi : start);
  search.last_step = search.hi - search.lo;
  search.iterations = 0;
  search.done = !(search.lo < search.hi);
  sol.t = search.t;
  return true;
}

// f(t) - k from the row sums of sigmoid_parts(): the integer count is exact in double, so
// the subtraction loses nothing before the small deviations are added.
VSOPS_HD double newton_residual(double above_sum, double deviation_sum, double target) {
  return (above_sum - target) + deviation_sum;
}

// One iteration: residual = sum sigmoid(s + t) - target and slope = sum sigmoid'(s + t) at
// search.t, the residual computed by newton_residual().
template <typename T>
VSOPS_HD void search_step(Search<T>& q, T residual, T slope) {
  const T r = residual;
  if (r < T(0)) {
    q.lo = q.t;
  } else if (r > T(0)) {
    q.hi = q.t;
  } else {
    q.done = true;
    return;
  }
  q.iterations += 1;
  const T newton_step = slope > T(0) ? -r / slope : T(0);
  const T next = q.t + newton_step;
  const bool inside = next > q.lo && next < q.hi;
  // A Newton step within tolerance ends the search. It may round to t itself or onto the
  // bracket end t just became, which is why it is tested before the bracket: bisecting
  // there would jump back across the whole bracket.
  if (slope > T(0) && abs_(newton_step) <= search_tolerance<T>(q.t)) {
    q.t = inside ? next : q.t;
    q.done = true;
    return;
  }
  // Newton inside the bracket while it at least halves the step it took before (the rtsafe
  // rule); otherwise bisect, which always shrinks the bracket.
  const bool newton_ok = slope > T(0) && inside && abs_(T(2) * newton_step) <= abs_(q.last_step);
  const T step = newton_ok ? newton_step : (q.lo + q.hi) * T(0.5) - q.t;
  q.t = q.t + step;
  q.last_step = step;
  const bool bracket_exhausted = !(q.t > q.lo && q.t < q.hi);
  if (bracket_exhausted || q.iterations >= kMaxSearchIterations) q.done = true;
}

template <typename T>
VSOPS_HD T mask_value(T s, const RowSolution<T>& sol) {
  if (s == infinity<T>()) return sol.pos_inf_value;
  if (s == -infinity<T>()) return sol.neg_inf_value;
  T sig, slope;
  sigmoid_and_slope(s + sol.t, sig, slope);
  return sig;
}

// v = dM/dz at s: the sigmoid slope, or M(1 - M) where M is a limit value (infinite s or t).
template <typename T>
VSOPS_HD T mask_slope(T s, const RowSolution<T>& sol) {
  const T z = s + sol.t;
  if (abs_(s) == infinity<T>() || abs_(sol.t) == infinity<T>() || is_nan(z)) {
    const T m = mask_value(s, sol);
    return m * (T(1) - m);
  }
  T sig, slope;
  sigmoid_and_slope(z, sig, slope);
  return slope;
}

// Eq. 8 folded: dL/ds_i = v_i * (g_i - sum(v g) / sum(v)); a row with sum(v) = 0 (fully
// saturated) has zero gradient.
template <typename T>
VSOPS_HD T backward_shift(T sum_vg, T sum_v) {
  return sum_v > T(0) ? sum_vg / sum_v : T(0);
}

}  // namespace difftopk
}  // namespace vsops
