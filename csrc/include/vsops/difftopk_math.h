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
//      t is carried as the unevaluated sum anchor + t (below), so the search meets its
//      tolerance at any finite scale of the scores;
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

// What the forward keeps per row for the backward: the threshold as anchor + t, and the
// values given to +inf and -inf entries (1 and 0 unless the row is saturated by infinite
// scores). Stored as four consecutive elements of the row_state tensor [S, 4].
//
// Every element is evaluated at z = (s + anchor) + t, in that order. The threshold of a row
// of scores near 1e8 is near -1e8, where a float t has a resolution of 8 while sigmoid
// changes over units; but s + anchor is exact for the scores near the threshold (Sterbenz:
// s and -anchor within a factor of 2), and the small t then places the threshold between
// them. Scores far from the threshold round in s + anchor, but their |z| is then so large
// that sigmoid is 0 or 1 either way. anchor is 0 unless the search needed it.
template <typename T>
struct RowSolution {
  T anchor;
  T t;
  T pos_inf_value;
  T neg_inf_value;
};

constexpr int kRowStateWidth = 4;

template <typename T>
VSOPS_HD void store_solution(const RowSolution<T>& sol, T* state) {
  state[0] = sol.anchor;
  state[1] = sol.t;
  state[2] = sol.pos_inf_value;
  state[3] = sol.neg_inf_value;
}

template <typename T>
VSOPS_HD RowSolution<T> load_solution(const T* state) {
  return RowSolution<T>{state[0], state[1], state[2], state[3]};
}

// z = (s + anchor) + t: the one evaluation order of every backend and pass.
template <typename T>
VSOPS_HD T shifted_score(T s, T anchor, T t) {
  return (s + anchor) + t;
}

// Safeguarded Newton (Newton inside a shrinking bracket, bisection when Newton leaves it or
// stalls). `target` is k itself: +inf entries contribute exactly 1 and -inf entries 0 to
// f(t) for any finite t, so the search sums over the whole row with no per-element test.
// The iterate is anchor + t with the bracket [lo, hi] on t; the kernels evaluate
// shifted_score(s, anchor, t).
template <typename T>
struct Search {
  T target;
  T anchor;
  T lo;
  T hi;
  T lo_slope;  // f' where the bracket ends were evaluated (0 before)
  T hi_slope;
  T t;
  T last_step;
  int iterations;
  bool anchored;
  bool done;
};

// A Newton step this small ends the search. Newton's error after a step d is about
// d^2 * |f''| / (2 f') <= d^2 / 2 for sigmoid sums, so 1e-5 in float (far above the float
// noise floor of the row sums) leaves ~1e-10 in t. The tolerance is absolute: one relative
// to |t| would end the search at |t| ~ 1e7 with t wrong by units; where t cannot be placed
// that finely, the search anchors instead (move_inside()).
template <typename T>
VSOPS_HD T search_tolerance();

template <>
VSOPS_HD float search_tolerance<float>() {
  return 1e-5f;
}

template <>
VSOPS_HD double search_tolerance<double>() {
  return 1e-12;
}
// x moved by 4 units of the given magnitude's last place (its sign gives the direction),
// unless that would overflow.
template <typename T>
VSOPS_HD T widened(T x, T magnitude) {
  const T moved = x + T(4) * epsilon<T>() * magnitude;
  return abs_(moved) < infinity<T>() ? moved : x;
}

// Decides a row from its statistics. Returns true when a search is needed (then `search`
// is initialised and `sol` must be completed by take_threshold() when it is done); false
// when `sol` is final.
// k is clamped to [0, n] so a bad k can never read or loop out of bounds (the Python
// layer rejects it before any kernel runs).
template <typename T>
VSOPS_HD bool plan_row(const RowStats<T>& st, int64_t k, RowSolution<T>& sol, Search<T>& search) {
  sol.anchor = T(0);
  sol.pos_inf_value = T(1);
  sol.neg_inf_value = T(0);
  if (st.n_nan > 0) {
    sol = RowSolution<T>{T(0), quiet_nan<T>(), quiet_nan<T>(), quiet_nan<T>()};
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
  search.anchor = T(0);
  search.anchored = false;
  search.lo_slope = T(0);
  search.hi_slope = T(0);
  // Both ends round (by half a unit of |max| or |min|, and base by a few units of its own):
  // widened by that much, the bracket holds t even when all finite scores are equal.
  search.lo = widened(base - st.max_finite, -(abs_(base) + abs_(st.max_finite)));
  search.hi = widened(base - st.min_finite, abs_(base) + abs_(st.min_finite));
  // Exact when all finite scores are equal (Jensen), so a good start for clustered rows.
  const T start = base - st.sum_finite / nf;
  search.t = start < search.lo ? search.lo : (start > search.hi ? search.hi : start);
  search.last_step = search.hi - search.lo;
  search.iterations = 0;
  search.done = !(search.lo < search.hi);
  sol.t = search.t;
  return true;
}

template <typename T>
VSOPS_HD void take_threshold(const Search<T>& search, RowSolution<T>& sol) {
  sol.anchor = search.anchor;
  sol.t = search.t;
}

// f(t) - k from the row sums of sigmoid_parts(): the integer count is exact in double, so
// the subtraction loses nothing before the small deviations are added.
VSOPS_HD double newton_residual(double above_sum, double deviation_sum, double target) {
  return (above_sum - target) + deviation_sum;
}

// Takes the Newton step when it stays strictly inside the bracket and either at least
// halves the step before it (the rtsafe rule) or spans at most a quarter of the bracket,
// else bisects. The second clause matters after anchoring, where the bracket may span
// 1e284 while Newton closes in on t by steps of units: bisecting there would take ~900
// passes. Returns false, leaving t, when neither lands strictly inside: the bracket ends
// are adjacent at t's resolution.
template <typename T>
VSOPS_HD bool move_inside(Search<T>& q, T newton_step, bool has_slope) {
  const T next = q.t + newton_step;
  const bool inside = next > q.lo && next < q.hi;
  const bool newton_ok = has_slope && inside &&
                         (abs_(T(2) * newton_step) <= abs_(q.last_step) ||
                          abs_(T(4) * newton_step) <= q.hi - q.lo);
  const T step = newton_ok ? newton_step : (q.lo + q.hi) * T(0.5) - q.t;
  const T moved = q.t + step;
  if (!(moved > q.lo && moved < q.hi)) return false;
  q.t = moved;
  q.last_step = step;
  return true;
}

// One iteration: residual = sum sigmoid(z) - target and slope = sum sigmoid'(z) at the
// iterate, the residual computed by newton_residual().
// Re-expresses the iterate as anchor + 0 with the bracket relative to it (see RowSolution).
template <typename T>
VSOPS_HD void anchor_at(Search<T>& q, T anchor) {
  q.anchored = true;
  q.anchor = anchor;
  q.lo = q.lo - q.anchor;
  q.hi = q.hi - q.anchor;
  q.t = T(0);
  q.last_step = q.hi - q.lo;
}

// One iteration: residual = sum sigmoid(z) - target and slope = sum sigmoid'(z) at the
// iterate, the residual computed by newton_residual().
//
// The search runs in two phases. Unanchored, z = s + t: the sums are accurate at every t
// (s + t is exact for the scores near -t, which decide f), but t itself resolves only to
// half a unit of its last place. Once that is coarser than the tolerance and the search
// has come that close, it anchors and goes on relative to the anchor, where t resolves
// finely: at t after a small Newton step, or, when the bracket cannot be split, at the end
// with the larger slope. That end is where some scores s have sigmoid(s + end) away from
// 0 and 1, so the threshold lies within a few units of it: when the scores are spaced far
// beyond sigmoid's range (|s| ~ 1e30), these are ties at -end and the relative t is their
// logit, which a neighbouring anchor one unit (1e23) away could not resolve.
template <typename T>
VSOPS_HD void search_step(Search<T>& q, T residual, T slope) {
  const T r = residual;
  if (r < T(0)) {
    q.lo = q.t;
    q.lo_slope = slope;
  } else if (r > T(0)) {
    q.hi = q.t;
    q.hi_slope = slope;
  } else {
    q.done = true;
    return;
  }
  q.iterations += 1;
  const bool has_slope = slope > T(0);
  const T newton_step = has_slope ? -r / slope : T(0);
  const T tolerance = search_tolerance<T>();
  const bool resolves_tolerance = q.anchored || abs_(q.t) * epsilon<T>() <= tolerance;
  // A Newton step within tolerance ends the search. It may round to t itself or onto the
  // bracket end t just became, which is why it is tested before the bracket: bisecting
  // there would jump back across the whole bracket.
  if (has_slope && abs_(newton_step) <= tolerance && resolves_tolerance) {
    const T next = q.t + newton_step;
    q.t = next > q.lo && next < q.hi ? next : q.t;
    q.done = true;
    return;
  }
  if (q.iterations >= kMaxSearchIterations) {
    q.done = true;
    return;
  }
  const bool converged_here = has_slope && abs_(newton_step) <= tolerance;
  if (!converged_here && move_inside(q, newton_step, has_slope)) return;
  if (!q.anchored && (converged_here || q.hi - q.lo > tolerance)) {
    const T anchor = converged_here ? q.t : (q.hi_slope > q.lo_slope ? q.hi : q.lo);
    const bool at_t = anchor == q.t;
    anchor_at(q, anchor);
    // The Newton step was taken at t; from another anchor the next pass evaluates there.
    if (!at_t || move_inside(q, newton_step, has_slope)) return;
  }
  q.done = true;
}

template <typename T>
VSOPS_HD T mask_value(T s, const RowSolution<T>& sol) {
  if (s == infinity<T>()) return sol.pos_inf_value;
  if (s == -infinity<T>()) return sol.neg_inf_value;
  T sig, slope;
  sigmoid_and_slope(shifted_score(s, sol.anchor, sol.t), sig, slope);
  return sig;
}

// v = dM/dz at s: the sigmoid slope, or M(1 - M) where M is a limit value (infinite s or t).
template <typename T>
VSOPS_HD T mask_slope(T s, const RowSolution<T>& sol) {
  const T z = shifted_score(s, sol.anchor, sol.t);
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
