// Loads and stores between an input dtype and its accumulation dtype, in at::vec lanes:
// float16/bfloat16 widen to float (one input vector is two float vectors), float and double
// load as they are.
#pragma once

#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace vsops {
namespace cpu {

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct VecIO {
  using Acc = acc_t<T>;
  using AccVec = at::vec::Vectorized<Acc>;
  static constexpr bool kReduced = !std::is_same_v<T, Acc>;
  // Input elements per step, and the accumulation vectors they fill.
  static constexpr int64_t kStep = at::vec::Vectorized<T>::size();
  static constexpr int kParts = kReduced ? 2 : 1;

  // Loads `count` <= kStep elements; lanes past count are zero.
  static void load(const T* p, int64_t count, AccVec (&out)[kParts]) {
    if constexpr (kReduced) {
      const auto v = at::vec::Vectorized<T>::loadu(p, count);
      std::tie(out[0], out[1]) = at::vec::convert_to_float(v);
    } else {
      out[0] = AccVec::loadu(p, count);
    }
  }

  static void load(const T* p, AccVec (&out)[kParts]) {
    if constexpr (kReduced) {
      std::tie(out[0], out[1]) = at::vec::convert_to_float(at::vec::Vectorized<T>::loadu(p));
    } else {
      out[0] = AccVec::loadu(p);
    }
  }

  // The same lanes of a buffer already in the accumulation dtype.
  static void load_acc(const Acc* p, int64_t count, AccVec (&out)[kParts]) {
    for (int q = 0; q < kParts; ++q) {
      const int64_t c = count - q * AccVec::size();
      out[q] = c >= AccVec::size() ? AccVec::loadu(p + q * AccVec::size())
               : c > 0             ? AccVec::loadu(p + q * AccVec::size(), c)
                                   : AccVec(Acc(0));
    }
  }

  static void store_acc(Acc* p, int64_t count, const AccVec (&in)[kParts]) {
    for (int q = 0; q < kParts; ++q) {
      const int64_t c = count - q * AccVec::size();
      if (c >= AccVec::size()) {
        in[q].store(p + q * AccVec::size());
      } else if (c > 0) {
        in[q].store(p + q * AccVec::size(), c);
      }
    }
  }

  static void store(T* p, int64_t count, const AccVec (&in)[kParts]) {
    if constexpr (kReduced) {
      at::vec::convert_from_float<T>(in[0], in[1]).store(p, count);
    } else {
      in[0].store(p, count);
    }
  }
};

}  // namespace cpu
}  // namespace vsops
