// Vectorized (at::vec) forms of the scalar DiffTopK helpers in vsops/difftopk_math.h.
// Each function here mirrors one scalar function there lane by lane; loop tails use the
// scalar functions directly, so both must stay in step.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include "vsops/difftopk_math.h"

namespace vsops {
namespace cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// float uses the 20-ulp exponential (about 1e-6 relative, far inside the operator's 1e-5
// accuracy target and ~2x faster); double keeps full precision for gradcheck.
inline Vec<float> vec_exp(const Vec<float>& x) { return x.exp_u20(); }
inline Vec<double> vec_exp(const Vec<double>& x) { return x.exp(); }

// Mirrors vsops::sigmoid_and_slope.
template <typename T>
inline void vec_sigmoid_and_slope(const Vec<T>& z, Vec<T>& sig, Vec<T>& slope) {
  const Vec<T> one(T(1));
  const Vec<T> e = vec_exp(z.abs().neg());
  const Vec<T> p = (one + e).reciprocal();
  const Vec<T> ep = e * p;
  sig = Vec<T>::blendv(ep, p, z >= Vec<T>(T(0)));
  slope = ep * p;
}

// Mirrors vsops::sigmoid_parts.
template <typename T>
inline void vec_sigmoid_parts(const Vec<T>& z, Vec<T>& above, Vec<T>& deviation, Vec<T>& slope) {
  const Vec<T> one(T(1)), zero(T(0));
  const Vec<T> e = vec_exp(z.abs().neg());
  const Vec<T> p = (one + e).reciprocal();
  const Vec<T> ep = e * p;
  const Vec<T> nonnegative = z >= zero;
  above = Vec<T>::blendv(zero, one, nonnegative);
  deviation = Vec<T>::blendv(ep, ep.neg(), nonnegative);
  slope = ep * p;
}

// difftopk::shifted_score on lanes, in the same order: (s + anchor) + t.
template <typename T>
inline Vec<T> vec_shifted_score(const Vec<T>& s, const Vec<T>& anchor, const Vec<T>& t) {
  return (s + anchor) + t;
}

// Mirrors vsops::difftopk::mask_value for a row with solution `sol`.
template <typename T>
inline Vec<T> vec_mask_value(const Vec<T>& s, const difftopk::RowSolution<T>& sol) {
  Vec<T> sig, slope;
  vec_sigmoid_and_slope(vec_shifted_score(s, Vec<T>(sol.anchor), Vec<T>(sol.t)), sig, slope);
  sig = Vec<T>::blendv(sig, Vec<T>(sol.pos_inf_value), s == Vec<T>(infinity<T>()));
  return Vec<T>::blendv(sig, Vec<T>(sol.neg_inf_value), s == Vec<T>(-infinity<T>()));
}

// Mirrors vsops::difftopk::mask_slope for a row whose threshold t is finite.
template <typename T>
inline Vec<T> vec_mask_slope_finite_t(const Vec<T>& s, const difftopk::RowSolution<T>& sol) {
  Vec<T> sig, slope;
  vec_sigmoid_and_slope(vec_shifted_score(s, Vec<T>(sol.anchor), Vec<T>(sol.t)), sig, slope);
  const T pos = sol.pos_inf_value, neg = sol.neg_inf_value;
  slope = Vec<T>::blendv(slope, Vec<T>(pos * (T(1) - pos)), s == Vec<T>(infinity<T>()));
  return Vec<T>::blendv(slope, Vec<T>(neg * (T(1) - neg)), s == Vec<T>(-infinity<T>()));
}

}  // namespace cpu
}  // namespace vsops
