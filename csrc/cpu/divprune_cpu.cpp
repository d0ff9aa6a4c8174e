// DivPrune on the CPU, per segment: rows normalized into the accumulation dtype, the
// nearest-neighbour pass as row tiles of one GEMM with a running maximum (the tiles kept where
// they are no larger than twice the tokens), then one sweep per pick (a kept similarity row or
// the GEMV of the pick, the running minimum distance and the argmax of the next pick over the
// unpicked tokens, threads splitting the tokens). The normalization and the products are
// ATen's own (MKL), in the tile shapes of vsops.reference.divprune_keep, so both pick the same
// tokens; the kernel saves the reference's per-pick Python and tensor passes.
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "op_common.h"

namespace vsops {
namespace cpu {
namespace {

constexpr int64_t kSweepGrain = 4096;

template <typename Acc>
struct Candidate {
  Acc key;
  int64_t index;  // -1: none
};

// The larger key, ties to the lower index.
template <typename Acc>
Candidate<Acc> larger(const Candidate<Acc>& a, const Candidate<Acc>& b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  return (b.key > a.key || (b.key == a.key && b.index < a.index)) ? b : a;
}

// NaN ranks below every number (and above the picked tokens, which are not candidates).
template <typename Acc>
Acc rank_key(Acc value) {
  return std::isnan(value) ? -std::numeric_limits<Acc>::max() : value;
}

// torch.minimum: NaN if either is NaN.
template <typename Acc>
Acc nan_min(Acc a, Acc b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<Acc>::quiet_NaN() : (b < a ? b : a);
}

// Whether the n x n similarities are kept for the greedy passes: as
// vsops.reference.divprune_keeps_similarity (at most twice the tokens' memory, or one tile).
bool keeps_similarity(int64_t n, int64_t d) { return n * n <= std::max(2 * n * d, kTileElements); }

// 1 - (max over j != i of unit_i . unit_j) for every token, over row tiles; the tiles go into
// `matrix` (with -inf on the diagonal, as the reference leaves them) when it is defined.
template <typename Acc>
std::vector<Acc> nearest_distances(const at::Tensor& unit, at::Tensor& matrix) {
  const int64_t n = unit.size(0);
  std::vector<Acc> nearest(n);
  const int64_t rows = std::max<int64_t>(1, kTileElements / n);
  for (int64_t r = 0; r < n; r += rows) {
    const int64_t m = std::min(rows, n - r);
    at::Tensor similarity = at::mm(unit.narrow(0, r, m), unit.t()).contiguous();
    Acc* sim = similarity.data_ptr<Acc>();
    at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        Acc* row = sim + i * n;
        row[r + i] = -std::numeric_limits<Acc>::infinity();  // a token is not its own neighbour
        Acc best = -std::numeric_limits<Acc>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          if (std::isnan(row[j])) {
            best = row[j];
            break;
          }
          if (row[j] > best) best = row[j];
        }
        nearest[r + i] = Acc(1) - best;
      }
    });
    if (matrix.defined()) matrix.narrow(0, r, m).copy_(similarity);
  }
  return nearest;
}

template <typename Acc>
int64_t first_unpicked_max(const std::vector<Acc>& values) {
  Candidate<Acc> best{Acc(0), -1};
  for (int64_t i = 0; i < static_cast<int64_t>(values.size()); ++i) {
    best = larger(best, Candidate<Acc>{rank_key(values[i]), i});
  }
  return best.index;
}

template <typename scalar_t>
void divprune_segment(const at::Tensor& x, int64_t count, bool* keep) {
  using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t n = x.size(0);
  if (count == n) {
    std::fill(keep, keep + n, true);
    return;
  }
  if (count == 0) return;
  const at::Tensor rows = x.to(c10::CppTypeToScalarType<Acc>::value);
  // As torch.nn.functional.normalize: a zero row stays zero.
  const at::Tensor unit = (rows / rows.norm(2, {1}, true).clamp_min(1e-12)).contiguous();
  at::Tensor matrix;
  if (keeps_similarity(n, x.size(1))) matrix = at::empty({n, n}, unit.options());
  std::vector<Acc> nearest = nearest_distances<Acc>(unit, matrix);
  std::vector<Acc> distance(n, std::numeric_limits<Acc>::infinity());
  std::vector<uint8_t> picked(n, 0);
  int64_t choice = first_unpicked_max(nearest);
  for (int64_t step = 0; step < count; ++step) {
    picked[choice] = 1;
    keep[choice] = true;
    if (step + 1 == count) break;
    // A kept row of the similarities, or one product with the tokens.
    const at::Tensor similarity = matrix.defined() ? matrix[choice] : at::mv(unit, unit[choice]);
    const Acc* sim = similarity.data_ptr<Acc>();
    const Candidate<Acc> next = at::parallel_reduce(
        int64_t(0), n, kSweepGrain, Candidate<Acc>{Acc(0), -1},
        [&](int64_t begin, int64_t end, Candidate<Acc> best) {
          for (int64_t i = begin; i < end; ++i) {
            distance[i] = nan_min(distance[i], Acc(1) - sim[i]);
            if (!picked[i]) best = larger(best, Candidate<Acc>{rank_key(distance[i]), i});
          }
          return best;
        },
        larger<Acc>);
    choice = next.index;
  }
}

}  // namespace

at::Tensor divprune_keep(const at::Tensor& x, const at::Tensor& k, const at::Tensor& cu_seqlens) {
  check_divprune_inputs(x, k, cu_seqlens);
  const int64_t segments = cu_seqlens.numel() - 1;
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  at::Tensor keep = at::zeros({x.size(0)}, x.options().dtype(at::kBool));
  const int64_t* kp = k.data_ptr<int64_t>();
  bool* out = keep.data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "vsops::divprune_keep", [&] {
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t start = cu[s], n = cu[s + 1] - cu[s];
      divprune_segment<scalar_t>(x.narrow(0, start, n), kp[s], out + start);
    }
  });
  return keep;
}

}  // namespace cpu
}  // namespace vsops
