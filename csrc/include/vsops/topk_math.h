// Hard top-k ordering, written once for the CPU and CUDA kernels.
//
// Scores are ranked by an unsigned key whose integer order is the float order, with NaN
// below -inf (a NaN score is never preferred over a real one). Ties go to the lower index.
// The GPU kernels select by a most-significant-bit-first radix search on these keys; the
// CPU kernel compares them directly.
#pragma once

#include <cstdint>
#include <cstring>

#include "vsops/macros.h"
#include "vsops/math.h"

namespace vsops {
namespace topk {

template <typename T>
struct KeyOf;

template <>
struct KeyOf<float> {
  using type = uint32_t;
  static constexpr int bits = 32;
};

template <>
struct KeyOf<double> {
  using type = uint64_t;
  static constexpr int bits = 64;
};

template <typename T>
VSOPS_HD typename KeyOf<T>::type ordered_key(T x) {
  using K = typename KeyOf<T>::type;
  constexpr K sign = K(1) << (KeyOf<T>::bits - 1);
  if (is_nan(x)) return K(0);
  if (x == T(0)) x = T(0);  // -0.0 == +0.0 as floats, so they must tie as keys too
  K bits;
  memcpy(&bits, &x, sizeof(T));
  // Negative floats order backwards as integers: flip all their bits; flip the sign bit of
  // positives to put them above.
  return (bits & sign) ? K(~bits) : K(bits | sign);
}

// True when element (key_a, index_a) ranks strictly before (key_b, index_b).
template <typename K>
VSOPS_HD bool ranks_before(K key_a, int64_t index_a, K key_b, int64_t index_b) {
  return key_a > key_b || (key_a == key_b && index_a < index_b);
}

}  // namespace topk
}  // namespace vsops
