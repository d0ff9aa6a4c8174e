// Scalar helpers overloaded on float/double so templated kernels pick the right precision
// on both compilers without std:: (not usable in device code) or CUDA intrinsics (not on host).
#pragma once

#include <cmath>
#include <cstdint>

#include "vsops/macros.h"

namespace vsops {

VSOPS_HD float exp_(float x) { return expf(x); }
VSOPS_HD double exp_(double x) { return exp(x); }
VSOPS_HD float log_(float x) { return logf(x); }
VSOPS_HD double log_(double x) { return log(x); }
VSOPS_HD float abs_(float x) { return fabsf(x); }
VSOPS_HD double abs_(double x) { return fabs(x); }

template <typename T>
VSOPS_HD T infinity() { return static_cast<T>(INFINITY); }

template <typename T>
VSOPS_HD T quiet_nan() { return static_cast<T>(NAN); }

template <typename T>
VSOPS_HD bool is_nan(T x) { return x != x; }

// Machine epsilon: the spacing of T just above 1.
template <typename T>
VSOPS_HD T epsilon();
template <>
VSOPS_HD float epsilon<float>() { return 1.1920929e-07f; }
template <>
VSOPS_HD double epsilon<double>() { return 2.220446049250313e-16; }

// Numerically stable logistic sigmoid and its derivative from one exponential:
// e = exp(-|z|) never overflows, and sigma(z) = p or e*p with p = 1/(1+e).
// z = +-inf gives exactly 1 or 0 with slope 0; NaN propagates.
template <typename T>
VSOPS_HD void sigmoid_and_slope(T z, T& sig, T& slope) {
  const T e = exp_(-abs_(z));
  const T p = T(1) / (T(1) + e);
  sig = z >= T(0) ? p : e * p;
  slope = e * p * p;
}

// The same sigmoid split as sigma(z) = above + deviation with above = [z >= 0] and
// |deviation| <= 1/2. Summing the parts separately keeps a row sum near n (k close to n)
// exact to float precision: sum sigma - k = (sum above - k) + sum deviation, where the first
// term is an exact integer and the second a sum of small numbers.
template <typename T>
VSOPS_HD void sigmoid_parts(T z, T& above, T& deviation, T& slope) {
  const T e = exp_(-abs_(z));
  const T p = T(1) / (T(1) + e);
  const T ep = e * p;
  above = z >= T(0) ? T(1) : T(0);
  deviation = z >= T(0) ? -ep : ep;
  slope = ep * p;
}

}  // namespace vsops
